"""Tokenize a corpus once into memmapped token files, and read them back as resumable batches.

``prepare`` streams the text (a corpus may be larger than RAM) and writes
``prep_dir/{tokenizer.json, manifest.json, <domain>.{train,val}.bin}`` atomically, resuming an interrupted
build; ``open_prepared`` checks it; ``TokenStream`` turns token arrays into (x, y) batches that are a pure
function of an integer cursor, which is what makes a resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from photon.config import DataConfig
from photon.data.corpora import Domain, default_domains, fetch_sources, user_domains
from photon.data.tokenizer import (
    EOT,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)
from photon.errors import UserError

log = logging.getLogger(__name__)
console = Console(stderr=True)

# Format 2 splits and orders documents by per-document hashes, so prepare can stream; the files and the
# manifest are laid out as in format 1, which therefore still opens (`photon prepare` rebuilds it).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SPLITS = ("train", "val")
DEFAULT_CACHE = Path("data/sources")
BATCH_BYTES = 1_000_000  # text per encode_batch call: plenty for the Rust thread pool, small in RAM
BUCKET_BYTES = 8_000_000  # a domain's text per shuffle bucket: the most text a shuffle holds in RAM at once
PROGRESS = "progress.json"  # in the build folder: the tokenizer and domains already done, for a resume


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


# ---------------------------------------------------------------------------------------------------------
# prepare: text -> tokenizer + shards
#
# Two passes over each domain's documents, neither keeping anything per document:
# 1. survey: size, checksum, and the tokenizer sample. Document i of domain d gets u_i = hash(seed, d, i),
#    uniform in [0, 1); it is held out for validation iff u_i < val_fraction (if that leaves no val document,
#    the one with the lowest u is val; no train document, the one with the highest u is train). The sample is
#    the train documents with the lowest u (a uniform random sample: a heap bounded by tokenizer_sample_mb
#    keeps their offsets in a spool file, not the text), water-filled across domains by `water_fill`.
# 2. encode: documents in batches through `encode_batch_fast` (all cores), EOT after each, dealt into buckets
#    of about BUCKET_BYTES by a second hash; each bucket is then shuffled with a seeded permutation and
#    appended to the shard. A shard is thus a random permutation of its documents, so any contiguous slice
#    of it (what partitions cut, what evaluation reads first) is a random sample of them.
# The build happens in `.<prep_dir>.partial` beside prep_dir, renamed into place at the end; progress.json in
# it records the tokenizer and each finished domain, so a rerun of the same recipe on unchanged files resumes.


def _recipe(cfg: DataConfig, vocab_size: int, source: Path | None) -> dict[str, Any]:
    """Everything that determines the prepared bytes; a prep_dir is reused only if this matches."""
    return {
        "vocab_size": vocab_size,
        "source": "default" if source is None else f"user:{Path(source).resolve()}",
        "max_mb_per_domain": cfg.max_mb_per_domain,
        "tokenizer_sample_mb": cfg.tokenizer_sample_mb,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _hash_key(seed: int, domain: str, salt: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}/{domain}/{salt}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _unit(key: np.uint64, idx: np.ndarray) -> np.ndarray:
    """A uniform value in [0, 1) per document index: splitmix64 of the index, keyed (wrapping uint64 math)."""
    with np.errstate(over="ignore"):
        z = key + (idx.astype(np.uint64) + np.uint64(1)) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _uniforms(key: np.uint64) -> Iterator[float]:
    for start in itertools.count(0, 4096):
        yield from _unit(key, np.arange(start, start + 4096)).tolist()


def _is_val(survey: dict[str, Any], u: np.ndarray, idx: np.ndarray, val_fraction: float) -> np.ndarray:
    val = u < val_fraction
    val[idx == survey["force_val"]] = True  # comparing with None matches nothing
    val[idx == survey["force_train"]] = False
    return val


def water_fill(sizes: dict[str, int], budget: float) -> dict[str, float]:
    """Bytes of each domain in a tokenizer sample of ``budget`` bytes, shared as evenly as possible.

    Small domains give all they have and the rest is split among the larger ones, so no domain's bytes
    dominate the merges just because it is bigger. No quota exceeds ``budget``, so a domain needs to offer
    only its first ``budget`` bytes.
    """
    left, quota = len(sizes), {}
    for d in sorted(sizes, key=lambda d: (sizes[d], d)):
        quota[d] = min(sizes[d], budget / left)
        budget -= quota[d]
        left -= 1
    return quota


def _survey(dom: Domain, cfg: DataConfig, spool: Path, progress: Progress,
            task: TaskID) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Pass 1 over one domain: its size and checksum, the split's fallbacks, and its tokenizer sample: the
    (offset, bytes) in ``spool`` of train documents by increasing u, about tokenizer_sample_mb of them."""
    budget = cfg.tokenizer_sample_mb * 1e6
    n = n_val = size = held = 0
    sha = hashlib.sha256()
    lo, hi = (2.0, -1), (-1.0, -1)  # (u, index) of the lowest and highest u
    heap: list[tuple[float, int, int, int]] = []  # (-u, index, bytes, offset in spool): the top is the highest u
    with open(spool, "wb") as f:
        for i, (doc, u) in enumerate(zip(dom.docs(), _uniforms(_hash_key(cfg.seed, dom.name, "split")))):
            raw = doc.encode("utf-8")
            sha.update(raw)
            sha.update(b"\x00")  # separator, so document boundaries are part of the checksum
            n, size = n + 1, size + len(raw)
            lo, hi = min(lo, (u, i)), max(hi, (u, i))
            if u < cfg.val_fraction:
                n_val += 1
            elif held < budget or u < -heap[0][0]:
                heapq.heappush(heap, (-u, i, len(raw), f.tell()))
                f.write(raw)  # documents that later leave the heap stay in the spool, unread
                held += len(raw)
                while held - heap[0][2] >= budget:  # keep the fewest lowest-u documents that fill the budget
                    held -= heapq.heappop(heap)[2]
            progress.advance(task, len(raw))
    if n < 2:
        raise UserError(f"domain {dom.name!r} has {n} document(s); it needs at least 2 (one is held out for "
                        "validation): split its text into several documents (in a domain's only .txt file, "
                        "blank lines separate documents)")
    survey = {"documents": n, "text_bytes": size, "text_sha256": sha.hexdigest(),
              "force_val": lo[1] if n_val == 0 else None, "force_train": hi[1] if n_val == n else None}
    return survey, [(off, nb) for _, i, nb, off in sorted(heap, reverse=True) if i != survey["force_val"]]


def _sample(spool: Path, kept: dict[str, list[tuple[int, int]]], quota: dict[str, float]) -> Iterator[str]:
    """Each domain's spooled documents in order until its quota, the last one cut so the share is exact."""
    for d in sorted(kept):
        taken = 0
        with open(spool / f"{d}.txt", "rb") as f:
            for off, nb in kept[d]:
                if taken >= quota[d]:
                    break
                f.seek(off)
                doc = f.read(nb).decode("utf-8")
                yield doc if taken + nb <= quota[d] else doc[: int(quota[d] - taken)]  # a cut word costs BPE nothing
                taken += nb


def _encode_batch(tok, docs: list[str], eot: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token ids, each followed by EOT, as one array; and each document's length."""
    ids = [e.ids for e in tok.encode_batch_fast(docs)]  # encode_batch without offsets: same ids, faster
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eot,)) for x in ids), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _append(path: Path, arr: np.ndarray) -> None:
    with open(path, "ab") as f:
        arr.tofile(f)


def _deal(work: Path, k: int, dom: Domain, survey: dict[str, Any], tok, dtype: np.dtype, cfg: DataConfig,
          progress: Progress, task: TaskID) -> None:
    """Encode a domain's documents in batches and append each to its bucket: ``work/<g>.{tokens,lengths}``
    with g = split * k + bucket."""
    split_key, bucket_key = _hash_key(cfg.seed, dom.name, "split"), _hash_key(cfg.seed, dom.name, "bucket")
    eot, sha, n = tok.token_to_id(EOT), hashlib.sha256(), 0
    for batch in _batches(dom.docs()):
        idx = np.arange(n, n + len(batch))
        n += len(batch)
        val = _is_val(survey, _unit(split_key, idx), idx, cfg.val_fraction)
        group = val * k + (_unit(bucket_key, idx) * k).astype(np.int64)
        flat, lengths = _encode_batch(tok, batch, eot, dtype)
        ends = np.cumsum(lengths)
        for g in np.unique(group):
            members = np.flatnonzero(group == g)
            _append(work / f"{g}.tokens", np.concatenate([flat[ends[j] - lengths[j]:ends[j]] for j in members]))
            _append(work / f"{g}.lengths", lengths[members])
        raw = [doc.encode("utf-8") for doc in batch]
        for r in raw:
            sha.update(r)
            sha.update(b"\x00")
        progress.advance(task, sum(map(len, raw)))
    if n != survey["documents"] or sha.hexdigest() != survey["text_sha256"]:
        raise UserError(f"domain {dom.name!r} changed while it was being prepared (files: "
                        f"{', '.join(map(str, dom.files[:3])) or 'built-in'}); run `photon prepare` again")


def _shuffle(work: Path, groups: range, dtype: np.dtype, seed: list[int], path: Path) -> dict[str, int]:
    """Write the buckets ``groups`` to ``path`` in order, each one's documents in a seeded random order."""
    docs = tokens = 0
    with open(path, "wb") as out:
        for g in groups:
            if not (work / f"{g}.lengths").exists():
                continue
            lengths = np.fromfile(work / f"{g}.lengths", dtype=np.int64)
            flat = np.fromfile(work / f"{g}.tokens", dtype=dtype)
            ends = np.cumsum(lengths)
            order = np.random.default_rng([*seed, g]).permutation(len(lengths))
            np.concatenate([flat[ends[j] - lengths[j]:ends[j]] for j in order]).tofile(out)
            docs, tokens = docs + len(lengths), tokens + flat.size
        out.flush()
        os.fsync(out.fileno())
    return {"documents": docs, "tokens": tokens}


def _write_domain(tmp: Path, dom: Domain, survey: dict[str, Any], tok, dtype: np.dtype, cfg: DataConfig,
                  progress: Progress, task: TaskID) -> dict[str, Any]:
    """Pass 2 over one domain: its shards, and its manifest entry."""
    k = max(1, math.ceil(survey["text_bytes"] / BUCKET_BYTES))
    work = tmp / "buckets"
    shutil.rmtree(work, ignore_errors=True)  # buckets of a run stopped inside this domain
    work.mkdir()
    _deal(work, k, dom, survey, tok, dtype, cfg, progress, task)
    entry: dict[str, Any] = {"text_sha256": survey["text_sha256"], "text_mb": round(survey["text_bytes"] / 1e6, 3)}
    seed = [cfg.seed, zlib.crc32(dom.name.encode())]
    for s, split in enumerate(SPLITS):
        entry[split] = _shuffle(work, range(s * k, (s + 1) * k), dtype, seed, tmp / f"{dom.name}.{split}.bin")
    shutil.rmtree(work)
    return entry


def _domains(source: Path | None, cache_dir: Path | None, max_mb: float | None) -> list[Domain]:
    if source is not None:
        found = user_domains(Path(source), max_mb)
    else:
        cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        fetch_sources(cache_dir)
        found = default_domains(cache_dir, max_mb)
    return sorted(found, key=lambda d: d.name)


def _fingerprint(domains: list[Domain]) -> str:
    """Names, sizes and mtimes of the files read (domains in name order, however listed): a resume must not
    mix shards of edited files, nor a reuse serve them stale."""
    h = hashlib.sha256()
    for d in sorted(domains, key=lambda d: d.name):
        h.update(f"{d.name}\n".encode())
        for f in d.files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _old_manifest(prep_dir: Path) -> dict[str, Any] | None:
    """The manifest of what `prep_dir` holds now; None if it holds none that reads as one."""
    try:
        manifest = json.loads((prep_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _reusable(manifest: dict[str, Any] | None, recipe: dict[str, Any], source: Path | None,
              max_mb: float | None) -> bool:
    """The folder of `manifest` was built by this recipe and, for the user's own text, from the files as they
    are now (names, sizes, mtimes: a file edited since is rebuilt, not served stale)."""
    if manifest is None or manifest.get("format") != FORMAT_VERSION or manifest.get("recipe") != recipe:
        return False
    # listing files is cheap; the built-in corpus's packages are pinned (its Python source is the interpreter's
    # standard library: a folder prepared under another Python version is kept, consistent with itself)
    if source is not None and "sources" in manifest:
        return manifest["sources"] == _fingerprint(user_domains(Path(source), max_mb))
    return True


def _recipe_of(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe a manifest records ({} for none, or one that is not a mapping)."""
    recipe = manifest.get("recipe") if manifest is not None else None
    return recipe if isinstance(recipe, dict) else {}


def _why_rebuilt(old: dict[str, Any] | None, recipe: dict[str, Any]) -> str:
    """Why a prepared folder is not reused, as a person would want it said."""
    if old is None:
        return "its manifest is unreadable"
    if old.get("format") != FORMAT_VERSION:
        return (f"it was prepared by another Photon version (data format {old.get('format')}; this one writes "
                f"{FORMAT_VERSION})")
    was = _recipe_of(old)
    changed = sorted(k for k in set(was) | set(recipe) if was.get(k) != recipe.get(k))
    if changed:
        return f"it was prepared with another {', '.join(changed)}"
    return "its text files changed since it was prepared"


def _source_name(source: str) -> str:
    """A recipe's `source` as a person names it."""
    return "the built-in corpus" if source == "default" else source.removeprefix("user:")


def _write_json(path: Path, obj: Any) -> None:
    """Write-then-rename, fsynced: a crash leaves the old file or the new one."""
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


@contextlib.contextmanager
def _claim(tmp: Path) -> Iterator[None]:
    """Hold the build folder ``tmp`` (created if missing): a second prepare into the same place is refused."""
    tmp.mkdir(exist_ok=True)
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    busy = UserError(f"another `photon prepare` is building {tmp} right now; wait for it to finish")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.path.samestat(os.fstat(fd), os.stat(tmp))  # not a folder a finished prepare renamed
        except (BlockingIOError, FileNotFoundError):
            raise busy from None
        if not same:
            raise busy
        yield
    finally:
        os.close(fd)  # releases the lock


def _start(tmp: Path, want: dict[str, Any], n_domains: int) -> dict[str, Any]:
    """The progress of an interrupted build of the same recipe from the same files, or a fresh start."""
    try:
        state = json.loads((tmp / PROGRESS).read_text())
        if all(state.get(k) == v for k, v in want.items()) and \
                tokenizer_sha256(tmp / "tokenizer.json") == state["tokenizer_sha256"]:
            console.log(f"resuming the interrupted prepare in {tmp} ({len(state['done'])} of {n_domains} "
                        "domains done)")
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for child in tmp.iterdir():  # another recipe, edited files, or stopped before the tokenizer was saved
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return dict(want, surveys=None, tokenizer_sha256=None, done={})


def _train(tmp: Path, domains: list[Domain], cfg: DataConfig, vocab_size: int, progress: Progress,
           state: dict[str, Any]) -> None:
    """Pass 1 over every domain, then the tokenizer; both recorded in progress.json."""
    task = progress.add_task("reading", total=None)
    spool = tmp / "sample"
    spool.mkdir()
    surveys, kept = {}, {}
    for dom in domains:
        surveys[dom.name], kept[dom.name] = _survey(dom, cfg, spool / f"{dom.name}.txt", progress, task)
    progress.remove_task(task)
    quota = water_fill({d: sum(nb for _, nb in k) for d, k in kept.items()}, cfg.tokenizer_sample_mb * 1e6)
    console.log(f"training a {vocab_size}-token BPE on {sum(quota.values()) / 1e6:.1f} MB from {len(domains)} "
                "domains")
    tok = train_tokenizer(_sample(spool, kept, quota), vocab_size)  # read as it trains: never all in RAM
    save_tokenizer(tok, tmp / "tokenizer.json")
    shutil.rmtree(spool)
    state.update(surveys=surveys, tokenizer_sha256=tokenizer_sha256(tmp / "tokenizer.json"))
    _write_json(tmp / PROGRESS, state)


def _build(tmp: Path, state: dict[str, Any], domains: list[Domain], cfg: DataConfig, vocab_size: int,
           timings: dict[str, float]) -> dict[str, Any]:
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn()]
    # transient: gone once done; not drawn where stderr is no terminal (a log, a pipe: it left a blank line)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        t0 = time.perf_counter()
        if state["tokenizer_sha256"] is None:
            _train(tmp, domains, cfg, vocab_size, progress, state)
        timings["survey_and_tokenizer_s"] = time.perf_counter() - t0
        tok = load_tokenizer(tmp / "tokenizer.json")
        dtype = token_dtype(vocab_size)
        surveys = state["surveys"]
        task = progress.add_task("tokenizing", total=sum(s["text_bytes"] for s in surveys.values()))
        for dom in domains:
            if dom.name in state["done"]:
                progress.advance(task, surveys[dom.name]["text_bytes"])
                continue
            state["done"][dom.name] = _write_domain(tmp, dom, surveys[dom.name], tok, dtype, cfg, progress, task)
            _write_json(tmp / PROGRESS, state)
        timings["encode_s"] = time.perf_counter() - t0 - timings["survey_and_tokenizer_s"]
    return {
        "format": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eot_id": tok.token_to_id(EOT),
        "tokenizer_sha256": state["tokenizer_sha256"],
        "source": state["recipe"]["source"],
        "seed": cfg.seed,
        "recipe": state["recipe"],
        "domains": {d.name: state["done"][d.name] for d in domains},
    }


def prepare(cfg: DataConfig, vocab_size: int, source: Path | None = None, cache_dir: Path | None = None,
            timings: dict[str, float] | None = None) -> Path:
    """Build ``cfg.prep_dir`` (tokenizer, shards, manifest) from the default corpus or ``source``; reuse it
    when it was already built from the same recipe, resume it when a build of the same recipe was stopped.

    ``timings``, if given, receives the seconds spent per phase (for `photon bench prepare`)."""
    prep_dir = Path(cfg.prep_dir)
    if source is not None and Path(source).resolve() in (prep_dir.resolve(), *prep_dir.resolve().parents):
        raise UserError(f"data.prep_dir={prep_dir} lies inside the text folder {source}: its files would be read as "
                        "text by the next prepare; choose a folder outside it (--out)")
    recipe = _recipe(cfg, vocab_size, source)
    old = _old_manifest(prep_dir)
    if _reusable(old, recipe, source, cfg.max_mb_per_domain):
        console.log(f"reusing prepared data in {prep_dir} (same vocab_size, source, files and seed)")
        return prep_dir
    was = _recipe_of(old).get("source")
    if was is not None and was != recipe["source"]:  # another corpus: never replaced without being asked
        raise UserError(f"data.prep_dir={prep_dir} holds data prepared from {_source_name(was)}; preparing "
                        f"{_source_name(recipe['source'])} there would replace it (and runs trained on it would "
                        f"refuse the new data): pass --out NEW_FOLDER for it, or delete {prep_dir} first")
    if (prep_dir / "manifest.json").exists():
        console.log(f"[yellow]rebuilding[/] {prep_dir}: {_why_rebuilt(old, recipe)}; the old data is replaced once "
                    "the new is complete (runs trained on it, and a server whose data it copied, will refuse the new "
                    "data if its tokenizer differs)")
    if prep_dir.exists() and not (prep_dir / "manifest.json").exists() and any(prep_dir.iterdir()):
        # Never delete a folder we did not write: it might be the user's own data.
        raise UserError(f"data.prep_dir={prep_dir} exists and is not a Photon prepared folder (no manifest.json); "
                        "choose another data.prep_dir or empty it")
    t0 = time.perf_counter()
    timings = {} if timings is None else timings
    domains = _domains(source, cache_dir, cfg.max_mb_per_domain)
    prep_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = prep_dir.parent / f".{prep_dir.name}.partial"
    with _claim(tmp):
        want = {"format": FORMAT_VERSION, "recipe": recipe, "sources": _fingerprint(domains)}
        state = _start(tmp, want, len(domains))
        try:
            manifest = _build(tmp, state, domains, cfg, vocab_size, timings)
        except BaseException as e:
            if isinstance(e, UserError) or not (tmp / PROGRESS).exists():
                shutil.rmtree(tmp, ignore_errors=True)  # bad input, or nothing worth resuming yet
            else:
                console.log(f"prepare stopped; {tmp} keeps the tokenizer and {len(state['done'])} finished "
                            "domain(s): the same command resumes from there")
            raise
        (tmp / PROGRESS).unlink()
        _write_json(tmp / "manifest.json", {**manifest, "sources": want["sources"]})
        _swap_in(tmp, prep_dir)
    timings["total_s"] = time.perf_counter() - t0
    tokens = sum(e["train"]["tokens"] + e["val"]["tokens"] for e in manifest["domains"].values())
    mb = sum(e["text_mb"] for e in manifest["domains"].values())
    console.log(f"prepared {len(domains)} domains, {mb:.1f} MB of text, {tokens / 1e6:.2f}M tokens in {prep_dir} "
                f"({timings['total_s']:.1f} s)")
    return prep_dir


def _swap_in(tmp: Path, prep_dir: Path) -> None:
    """Put the finished ``tmp`` at ``prep_dir``; an old prepared folder is moved aside first, then deleted."""
    old = None
    if prep_dir.exists():
        old = Path(tempfile.mkdtemp(dir=prep_dir.parent, prefix=f".{prep_dir.name}.old-"))
        os.replace(prep_dir, old / "d")
    os.replace(tmp, prep_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Reading prepared data back

_FIX = "run `photon prepare` again"


@dataclass
class Prepared:
    path: Path
    manifest: dict[str, Any]

    @property
    def domains(self) -> list[str]:
        return sorted(self.manifest["domains"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def tokens(self, domain: str, split: str) -> np.ndarray:
        """The read-only memmap of one domain's train or val tokens (documents end with EOT)."""
        if domain not in self.manifest["domains"]:
            raise UserError(f"unknown domain {domain!r}; prepared domains: {', '.join(self.domains)}")
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use 'train' or 'val'")
        n = self.manifest["domains"][domain][split]["tokens"]
        if n == 0:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(self.path / f"{domain}.{split}.bin", dtype=self.dtype, mode="r", shape=(n,))


def open_prepared(prep_dir: Path) -> Prepared:
    """Open and check a prepared folder: manifest readable, shard sizes right, tokenizer the one it was built with."""
    prep_dir = Path(prep_dir)
    mpath = prep_dir / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{prep_dir}: no prepared data (manifest.json missing); run `photon prepare`")
    try:
        manifest = json.loads(mpath.read_text())
        domains = manifest["domains"]
        dtype = np.dtype(manifest["dtype"])
        expected = {f"{d}.{s}.bin": domains[d][s]["tokens"] * dtype.itemsize for d in domains for s in SPLITS}
        want_sha = manifest["tokenizer_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{mpath}: manifest is corrupt; {_FIX}") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise UserError(f"{mpath}: format {manifest.get('format')} is not one this version reads "
                        f"({', '.join(map(str, READABLE_FORMATS))}); {_FIX}")
    for name, size in expected.items():
        f = prep_dir / name
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(f"{f}: missing or not the size the manifest says ({size} bytes); {_FIX}")
    tok = prep_dir / "tokenizer.json"
    if not tok.is_file():
        raise UserError(f"{tok}: tokenizer missing; {_FIX}")
    if tokenizer_sha256(tok) != want_sha:
        raise UserError(f"{tok}: tokenizer does not match the shards (sha256 differs from manifest.json); {_FIX}")
    return Prepared(prep_dir, manifest)


# ---------------------------------------------------------------------------------------------------------
# Batches


def rows_in(n_tokens: int, seq_len: int) -> int:
    """How many rows of `seq_len` + 1 tokens (inputs and their next-token targets), one starting every
    `seq_len` tokens, `n_tokens` hold: what training and evaluation cut a span of tokens into."""
    return max(0, (n_tokens - 1) // seq_len)


class TokenStream:
    """(x, y) batches of ``batch_size`` rows of ``seq_len`` tokens, as a pure function of an integer cursor.

    Each array is cut into rows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens (neighbouring rows
    share one token, so every token but an array's first is a target once per epoch). All rows of all
    arrays form one index space of ``rows``; epoch ``e`` visits it in the order of a permutation seeded with
    ``(seed, e)``. The cursor counts rows consumed, so a run resumed at cursor ``c`` gets exactly the batches
    an uninterrupted run would have.
    """

    def __init__(self, arrays: list[np.ndarray], seq_len: int, batch_size: int, seed: int):
        assert seq_len >= 1 and batch_size >= 1, (seq_len, batch_size)
        self.arrays, self.seq_len, self.batch_size, self.seed = list(arrays), seq_len, batch_size, seed
        counts = np.array([rows_in(len(a), seq_len) for a in self.arrays], dtype=np.int64)
        if counts.sum() < 1:
            sizes = [len(a) for a in self.arrays]
            raise UserError(f"token spans of sizes {sizes[:8]}{'...' if len(sizes) > 8 else ''} are all shorter "
                            f"than seq_len+1={seq_len + 1}; lower train.seq_len or use fewer clients")
        # offsets[i] = first global row of array i; searchsorted(side="right") maps a row to its array,
        # and skips arrays with no rows because they share their offset with the next array.
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._perms: dict[int, np.ndarray] = {}

    @property
    def rows(self) -> int:
        return int(self._offsets[-1])

    def epoch(self, cursor: int) -> int:
        return cursor // self.rows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most a few epochs; keep the cache small
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return self._perms[epoch]

    def rows_at(self, cursor: int, n: int) -> np.ndarray:
        """Global row ids of the ``n`` rows starting at ``cursor``."""
        g = np.arange(cursor, cursor + n, dtype=np.int64)
        epochs, pos = np.divmod(g, self.rows)
        out = np.empty(n, dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[pos[m]]
        return out

    def next_batch(self, cursor: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        assert cursor >= 0, cursor
        T, B = self.seq_len, self.batch_size
        rows = self.rows_at(cursor, B)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        starts = (rows - self._offsets[which]) * T
        block = np.empty((B, T + 1), dtype=np.int64)
        span = np.arange(T + 1)
        for a in np.unique(which):
            m = which == a
            block[m] = self.arrays[a][starts[m, None] + span]
        # Contiguous copies, so callers can .view(-1) the targets.
        return torch.from_numpy(block[:, :-1].copy()), torch.from_numpy(block[:, 1:].copy()), cursor + B


def eval_batches(arr: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n_batches`` contiguous (x, y) batches from the start of ``arr``, the same every call.

    Only full batches, unless the array holds less than one: then a single smaller batch, so any array of
    at least ``seq_len + 1`` tokens is evaluated.
    """
    T = seq_len
    avail = rows_in(len(arr), T)
    n_rows = min(avail, n_batches * batch_size)
    if n_rows >= batch_size:
        n_rows -= n_rows % batch_size
    if n_rows == 0:
        return []
    idx = (np.arange(n_rows)[:, None] * T) + np.arange(T + 1)
    block = np.asarray(arr[: n_rows * T + 1])[idx].astype(np.int64)
    return [(torch.from_numpy(b[:, :-1].copy()), torch.from_numpy(b[:, 1:].copy()))
            for b in np.split(block, range(batch_size, n_rows, batch_size))]
