"""Tokenize a corpus once into memmapped token files, and read them back as resumable batches.

``prepare`` writes ``prep_dir/{tokenizer.json, manifest.json, <domain>.{train,val}.bin}`` atomically;
``open_prepared`` checks it; ``TokenStream`` turns token arrays into (x, y) batches that are a pure function
of an integer cursor, which is what makes a resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from photon.config import DataConfig
from photon.data.corpora import fetch_sources, load_default_corpus, load_user_corpus
from photon.data.tokenizer import EOT, save_tokenizer, tokenizer_sha256, train_tokenizer
from photon.errors import UserError

log = logging.getLogger(__name__)
console = Console(stderr=True)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_CACHE = Path("data/sources")
ENCODE_CHUNK = 256  # documents per encode_batch call: big enough for the Rust thread pool, small in RAM


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


# ---------------------------------------------------------------------------------------------------------
# prepare: text -> tokenizer + shards


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


def _split(name: str, docs: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    if len(docs) < 2:
        raise UserError(f"domain {name!r} has {len(docs)} document; it needs at least 2 (one is held out for "
                        "validation): split its text into several documents")
    # Seed per domain by name, so adding a domain does not reshuffle the others.
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    order = rng.permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(cfg.val_fraction * len(docs))))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def tokenizer_sample(train: dict[str, list[str]], sample_mb: float) -> list[str]:
    """About ``sample_mb`` MB of training text, shared as evenly as possible over the domains.

    Water-filling: small domains give all they have and the rest is split among the larger ones, so no
    domain's bytes dominate the merges just because it is bigger.
    """
    sizes = {d: sum(len(doc.encode("utf-8")) for doc in docs) for d, docs in train.items()}
    budget, left = sample_mb * 1e6, len(sizes)
    quota = {}
    for d in sorted(sizes, key=lambda d: (sizes[d], d)):
        quota[d] = min(sizes[d], budget / left)
        budget -= quota[d]
        left -= 1
    sample = []
    for d in sorted(train):
        taken = 0
        for doc in train[d]:
            if taken >= quota[d]:
                break
            n = len(doc.encode("utf-8"))
            # Cut the last document so a domain's share is exact; a cut word costs BPE nothing.
            sample.append(doc if taken + n <= quota[d] else doc[: int(quota[d] - taken)])
            taken += n
    return sample


def _text_sha256(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\x00")  # separator, so document boundaries are part of the checksum
    return h.hexdigest()


def _encode_to(path: Path, docs: list[str], tok, dtype: np.dtype, progress: Progress, task) -> int:
    eot = tok.token_to_id(EOT)
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[i: i + ENCODE_CHUNK]
            ids = [np.append(np.asarray(e.ids, dtype=dtype), dtype.type(eot)) for e in tok.encode_batch(chunk)]
            block = np.concatenate(ids)
            block.tofile(f)
            n += block.size
            progress.advance(task, sum(len(d) for d in chunk))
    return n


def _load(source: Path | None, cache_dir: Path | None, max_mb: float | None) -> dict[str, list[str]]:
    if source is not None:
        return load_user_corpus(Path(source), max_mb)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    fetch_sources(cache_dir)
    return load_default_corpus(cache_dir, max_mb)


def _reusable(prep_dir: Path, recipe: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((prep_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format") == FORMAT_VERSION and manifest.get("recipe") == recipe


def prepare(cfg: DataConfig, vocab_size: int, source: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Build ``cfg.prep_dir`` (tokenizer, shards, manifest) from the default corpus or ``source``; reuse it
    when it was already built from the same recipe."""
    prep_dir = Path(cfg.prep_dir)
    recipe = _recipe(cfg, vocab_size, source)
    if _reusable(prep_dir, recipe):
        console.log(f"reusing prepared data in {prep_dir} (same vocab_size, source and seed)")
        return prep_dir
    if prep_dir.exists() and not (prep_dir / "manifest.json").exists() and any(prep_dir.iterdir()):
        # Never delete a folder we did not write: it might be the user's own data.
        raise UserError(f"data.prep_dir={prep_dir} exists and is not a Photon prepared folder (no manifest.json); "
                        "choose another data.prep_dir or empty it")
    t0 = time.perf_counter()
    corpus = _load(source, cache_dir, cfg.max_mb_per_domain)
    split = {d: _split(d, docs, cfg) for d, docs in sorted(corpus.items())}

    prep_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=prep_dir.parent, prefix=f".{prep_dir.name}.tmp-"))
    try:
        sample = tokenizer_sample({d: tr for d, (tr, _) in split.items()}, cfg.tokenizer_sample_mb)
        sample_mb = sum(len(x.encode("utf-8")) for x in sample) / 1e6
        console.log(f"training a {vocab_size}-token BPE on {sample_mb:.1f} MB from {len(split)} domains")
        tok = train_tokenizer(sample, vocab_size)
        del sample
        save_tokenizer(tok, tmp / "tokenizer.json")
        dtype = token_dtype(vocab_size)
        domains = {}
        total = sum(len(doc) for tr, va in split.values() for doc in tr + va)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("tokenizing (chars)", total=total)
            for d, (train, val) in split.items():
                entry = {"text_sha256": _text_sha256(corpus[d]),
                         "text_mb": round(sum(len(x.encode("utf-8")) for x in corpus[d]) / 1e6, 3)}
                for name, docs in zip(SPLITS, (train, val)):
                    n = _encode_to(tmp / f"{d}.{name}.bin", docs, tok, dtype, progress, task)
                    entry[name] = {"documents": len(docs), "tokens": n}
                domains[d] = entry
        manifest = {
            "format": FORMAT_VERSION,
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "eot_id": tok.token_to_id(EOT),
            "tokenizer_sha256": tokenizer_sha256(tmp / "tokenizer.json"),
            "source": recipe["source"],
            "seed": cfg.seed,
            "recipe": recipe,
            "domains": domains,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, prep_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tokens = sum(e["train"]["tokens"] + e["val"]["tokens"] for e in domains.values())
    console.log(f"prepared {len(domains)} domains, {tokens / 1e6:.2f}M tokens in {prep_dir} "
                f"({time.perf_counter() - t0:.1f} s)")
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
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{mpath}: format {manifest.get('format')} is not {FORMAT_VERSION}; {_FIX}")
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
        counts = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], dtype=np.int64)
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
    avail = max(0, (len(arr) - 1) // T)
    n_rows = min(avail, n_batches * batch_size)
    if n_rows >= batch_size:
        n_rows -= n_rows % batch_size
    if n_rows == 0:
        return []
    idx = (np.arange(n_rows)[:, None] * T) + np.arange(T + 1)
    block = np.asarray(arr[: n_rows * T + 1])[idx].astype(np.int64)
    return [(torch.from_numpy(b[:, :-1].copy()), torch.from_numpy(b[:, 1:].copy()))
            for b in np.split(block, range(batch_size, n_rows, batch_size))]
