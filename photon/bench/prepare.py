"""`photon bench prepare`: the streaming `photon prepare` against one `encode_batch` call, and its memory.

Inputs are the built-in corpus repeated to each size (0.1 and 1 GB by default), written as a user corpus in
all three formats. Each prepare runs in a fresh process whose peak RSS is read with wait4; it must stay flat
as the input grows ten-fold. The baseline encodes the smallest input's text in one call, in its own process.
Stored in docs/results/prepare.json; `render` turns that into markdown and reads nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.outdir import fresh_out_dir
from photon.bench.results import LoadSampler, save_result
from photon.config import DataConfig, RunConfig

# How each built-in domain is written: prose as one big .txt (documents at blank lines), the rest as JSONL and
# Parquet, so every streaming reader is measured.
FORMATS = {"literature": "txt", "speech_sotu": "txt", "brown": "jsonl", "news_bbc": "jsonl", "email": "jsonl",
           "code_python": "parquet"}
ROW_GROUP_BYTES = 4_000_000  # text per Parquet row group in the generated inputs
FLAT = 1.2  # peak RSS at 10x the input may grow by at most this factor to count as flat


def make_input(corpus: dict[str, list[str]], root: Path, gb: float) -> float:
    """Write ``corpus`` repeated to about ``gb`` GB of text under ``root/<domain>/``; returns the MB written.

    Each domain keeps its share of the corpus; documents are repeated in order, cut off at the share."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = {d: sum(len(x.encode("utf-8")) for x in docs) for d, docs in corpus.items()}
    total = sum(sizes.values())
    written = 0
    for d, docs in corpus.items():
        want = gb * 1e9 * sizes[d] / total
        kind = FORMATS.get(d, "jsonl")
        (root / d).mkdir(parents=True)
        path = root / d / f"{d}.{kind}"
        size, i = 0, 0
        if kind == "parquet":
            with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as w:
                while size < want:
                    rows, group = [], 0
                    while group < ROW_GROUP_BYTES and size + group < want:
                        rows.append(docs[i % len(docs)])
                        group += len(rows[-1].encode("utf-8"))
                        i += 1
                    w.write_table(pa.table({"text": rows}))
                    size += group
        else:
            with open(path, "w", encoding="utf-8") as f:
                while size < want:
                    doc = docs[i % len(docs)]
                    i += 1
                    f.write(doc + "\n\n" if kind == "txt" else json.dumps({"text": doc}) + "\n")
                    size += len(doc.encode("utf-8"))
        written += size
    return written / 1e6


def _run_child(args: list[str], log: Path) -> tuple[dict[str, Any], float]:
    """Run this module with ``args`` in a fresh process; its JSON answer and its peak RSS in MB."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "photon.bench.prepare", *args], stdout=subprocess.PIPE,
                                stderr=err, env=env, text=True)
        out = proc.stdout.read()
        # wait4, not RUSAGE_CHILDREN: the latter is the maximum over every child so far, not this one's.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:1])} failed with code {proc.returncode}; see {log}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def _child_prepare(data_json: str, vocab_size: int, source: str) -> dict[str, Any]:
    from photon.data.shards import prepare

    cfg = DataConfig.model_validate_json(data_json)
    timings: dict[str, float] = {}
    prep = prepare(cfg, vocab_size, source=Path(source), timings=timings)
    manifest = json.loads((prep / "manifest.json").read_text())
    domains = manifest["domains"].values()
    return {"timings": timings, "text_mb": sum(e["text_mb"] for e in domains),
            "documents": sum(e[s]["documents"] for e in domains for s in ("train", "val")),
            "tokens": sum(e[s]["tokens"] for e in domains for s in ("train", "val"))}


def _child_baseline(source: str, tokenizer: str) -> dict[str, Any]:
    """HF tokenizers on the same documents in one call each (all in RAM), without photon around it."""
    from photon.data.corpora import user_domains
    from photon.data.tokenizer import load_tokenizer

    docs = [doc for d in user_domains(Path(source)) for doc in d.docs()]
    mb = sum(len(x.encode("utf-8")) for x in docs) / 1e6
    tok = load_tokenizer(Path(tokenizer))
    out: dict[str, Any] = {"text_mb": mb, "documents": len(docs)}
    for call in ("encode_batch", "encode_batch_fast"):
        t0 = time.perf_counter()
        enc = getattr(tok, call)(docs)
        seconds = time.perf_counter() - t0
        out[call] = {"seconds": seconds, "mb_s": mb / seconds, "tokens": sum(len(e.ids) for e in enc)}
        del enc
    return out


def builtin_corpus(cache: Path) -> dict[str, list[str]]:
    """The built-in corpus (about 50 MB), fetched into ``cache`` on first use."""
    from photon.data.corpora import fetch_sources, load_default_corpus

    fetch_sources(cache)
    return load_default_corpus(cache)


def run_prepare_bench(cfg: RunConfig, sizes: tuple[float, ...], out: Path, corpus: dict[str, list[str]],
                      console: Console | None = None, results_dir: Path | None = None) -> dict[str, Any]:
    """Prepare ``corpus`` repeated to each of ``sizes`` (GB), and the one-call baseline on the first size."""
    console = console or Console()
    fresh_out_dir(out)
    runs, baseline = [], None
    started = time.time()
    with LoadSampler() as load:
        for gb in sizes:
            src, prep = out / f"input-{gb:g}gb", out / f"prep-{gb:g}gb"
            console.print(f"writing the built-in corpus repeated to {gb:g} GB in {src}")
            make_input(corpus, src, gb)
            data = cfg.data.model_copy(update={"prep_dir": prep, "max_mb_per_domain": None})  # all of it
            console.print(f"photon prepare on {gb:g} GB (fresh process)")
            res, rss = _run_child(["prepare", data.model_dump_json(), str(cfg.model.vocab_size), str(src)],
                                  out / f"prepare-{gb:g}gb.log")
            t = res["timings"]
            runs.append({"size_gb": gb, "text_mb": res["text_mb"], "documents": res["documents"],
                         "tokens": res["tokens"], "seconds": t["total_s"], "mb_s": res["text_mb"] / t["total_s"],
                         "phases_s": {k: v for k, v in t.items() if k != "total_s"},
                         "encode_mb_s": res["text_mb"] / t["encode_s"], "peak_rss_mb": rss})
            console.print(f"  {runs[-1]['mb_s']:.2f} MB/s end to end, peak RSS {rss:.0f} MB")
            if baseline is None:
                console.print(f"baseline: one encode_batch call on the same {gb:g} GB of text (fresh process)")
                base, brss = _run_child(["baseline", str(src), str(prep / "tokenizer.json")], out / "baseline.log")
                baseline = {"size_gb": gb, **base, "peak_rss_mb": brss}
                console.print(f"  {base['encode_batch']['mb_s']:.2f} MB/s, peak RSS {brss:.0f} MB")
            shutil.rmtree(src)
            shutil.rmtree(prep)
    data = {"vocab_size": cfg.model.vocab_size, "tokenizer_sample_mb": cfg.data.tokenizer_sample_mb,
            "formats": FORMATS, "cores": os.cpu_count(), "runs": runs, "baseline": baseline}
    kwargs = {"results_dir": results_dir} if results_dir is not None else {}
    path = save_result("prepare", data, load, started=started, **kwargs)
    console.print(render(data))
    console.print(f"stored in {path}")
    return data


def render(data: dict[str, Any]) -> str:
    """The markdown table and goal lines for docs/RESULTS.md."""
    runs, base = data["runs"], data["baseline"]
    lines = [f"The built-in corpus repeated to each size and written as a user corpus (prose as one big .txt per "
             f"domain, split at blank lines; JSONL; Parquet), vocabulary {data['vocab_size']:,}, tokenizer sample "
             f"{data['tokenizer_sample_mb']:g} MB, {data['cores']} cores. Each prepare and the baseline run in a "
             "fresh process; peak RSS is that process's. The baseline is HF `tokenizers` encoding the first "
             "input's documents, all in RAM, in one call.", "",
             "| input | text | documents | tokens | wall | MB/s end to end | MB/s encode phase | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| `photon prepare`, {r['size_gb']:g} GB | {r['text_mb']:,.0f} MB | {r['documents']:,} | "
                     f"{r['tokens'] / 1e6:,.1f}M | {r['seconds']:,.0f} s | {r['mb_s']:.2f} | "
                     f"{r['encode_mb_s']:.2f} | {r['peak_rss_mb']:,.0f} MB |")
    for call in ("encode_batch", "encode_batch_fast"):
        b = base[call]
        lines.append(f"| `{call}`, one call, {base['size_gb']:g} GB | {base['text_mb']:,.0f} MB | "
                     f"{base['documents']:,} | {b['tokens'] / 1e6:,.1f}M | {b['seconds']:,.0f} s | | {b['mb_s']:.2f} | "
                     f"{base['peak_rss_mb']:,.0f} MB |")
    first = runs[0]
    lines += ["", f"- Speed on the same {first['size_gb']:g} GB of text: `photon prepare` end to end (reading twice, "
              f"training the tokenizer, shuffling) {first['mb_s'] / base['encode_batch']['mb_s']:.2f}× one "
              f"`encode_batch` call; its encode phase {first['encode_mb_s'] / base['encode_batch']['mb_s']:.2f}× "
              f"(`encode_batch_fast`, which prepare uses: "
              f"{first['encode_mb_s'] / base['encode_batch_fast']['mb_s']:.2f}×)."]
    if len(runs) > 1:
        big = runs[-1]
        growth = big["peak_rss_mb"] / first["peak_rss_mb"]
        lines.append(f"- Peak RSS as the input grows {big['size_gb'] / first['size_gb']:g}×: "
                     f"{first['peak_rss_mb']:,.0f} → {big['peak_rss_mb']:,.0f} MB ({growth:.2f}×; goal: flat, "
                     f"≤ {FLAT:g}×: {'met' if growth <= FLAT else 'NOT met'}); the one-call baseline needed "
                     f"{base['peak_rss_mb']:,.0f} MB for {first['size_gb']:g} GB.")
    return "\n".join(lines)


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    result = _child_prepare(rest[0], int(rest[1]), rest[2]) if kind == "prepare" else _child_baseline(*rest)
    print(json.dumps(result))
