"""SHA-256 fingerprints: of files (checkpoints, archives, tokenizers) and of parameter sets.

A parameter digest covers names, dtypes, shapes and bytes in name order, so two runs end "bitwise equal"
exactly when their digests match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes (no copy; any dtype)
    return h.hexdigest()
