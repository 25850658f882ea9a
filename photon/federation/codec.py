"""How named tensors travel: encoded into one flat `uint8` byte array plus a JSON-able layout, and back.

Engine-free (no Flower): the Flower adapter (`records.py`) only wraps a `Payload` into a record, and the
in-process engine hands it over as is, so both engines decode exactly the same bytes. Decoding is the first
check of an untrusted reply: the layout must name exactly the tensors and shapes the receiver expects, and
the byte count must be exactly what that layout needs, before anything is allocated from it. Nothing here is
pickled; the dtype and shape of every tensor come from the receiver's expectation, never from the sender.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Layout = list[tuple[str, tuple[int, ...]]]  # (name, shape), sorted by name


class CodecError(ValueError):
    """A payload that cannot be decoded into what the receiver expects (the reason says why)."""


@dataclass
class Payload:
    """One encoded set of tensors: `layout` (JSON-able: codec name, tensor names and shapes) and the bytes.

    `data` is a 1-D uint8 array; when it was built over an immutable `bytes` object, `buffer` is that object,
    so a transport that needs `bytes` (Flower's Array) can take it without another copy."""

    layout: dict[str, Any]
    data: np.ndarray  # 1-D uint8
    buffer: bytes | None = None

    @classmethod
    def over(cls, layout: dict[str, Any], buffer: bytes) -> Payload:
        return cls(layout, np.frombuffer(buffer, dtype=np.uint8), buffer)

    def as_bytes(self) -> bytes:
        if self.buffer is not None and len(self.buffer) == self.nbytes:
            return self.buffer
        return self.data.tobytes()

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def layout_json(self) -> str:
        return json.dumps(self.layout, separators=(",", ":"))

    @classmethod
    def from_parts(cls, layout_json: str, data: np.ndarray | bytes | memoryview) -> Payload:
        try:
            layout = json.loads(layout_json)
        except (TypeError, ValueError) as e:
            raise CodecError(f"payload layout is not JSON ({e})") from None
        if not isinstance(layout, dict):
            raise CodecError("payload layout is not a JSON object")
        array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        if array.dtype != np.uint8 or array.ndim != 1:
            raise CodecError(f"payload bytes must be a 1-D uint8 array, got {array.dtype} {array.shape}")
        return cls(layout, array)


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    return [(name, tuple(tensors[name].shape)) for name in sorted(tensors)]


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------
# fp32: the reference codec, bit-exact


def encode(tensors: Mapping[str, torch.Tensor], codec: str = "fp32") -> Payload:
    """Encode `tensors` (any float dtype; sorted by name) with `codec`."""
    if codec != "fp32":
        raise ValueError(f"unknown codec {codec!r}")
    names = sorted(tensors)
    parts = (memoryview(tensors[n].detach().to(torch.float32).contiguous().reshape(-1).numpy()).cast("B")
             for n in names)
    buffer = b"".join(parts)  # the one copy: straight into the bytes a transport sends
    return Payload.over({"codec": codec, "tensors": [[n, list(tensors[n].shape)] for n in names]}, buffer)


def check_layout(payload: Payload, expected: Layout) -> None:
    """The payload's tensor list equals `expected` (names and shapes), else CodecError naming the first
    difference."""
    got = payload.layout.get("tensors")
    if not isinstance(got, list):
        raise CodecError("payload layout has no tensor list")
    try:
        got_layout = [(str(n), tuple(int(d) for d in s)) for n, s in got]
    except (TypeError, ValueError):
        raise CodecError("payload layout's tensor list is malformed") from None
    if got_layout != list(expected):
        want = dict(expected)
        for name, shape in got_layout:
            if name not in want:
                raise CodecError(f"payload has unexpected tensor {name!r}")
            if want[name] != shape:
                raise CodecError(f"payload tensor {name!r} has shape {shape}, expected {want[name]}")
        missing = sorted(set(want) - {n for n, _ in got_layout})
        raise CodecError(f"payload lacks tensors {missing[:3]}" if missing else "payload tensors are out of order")


def decode(payload: Payload, expected: Layout) -> dict[str, torch.Tensor]:
    """fp32 tensors named and shaped as `expected`; CodecError if the payload is not exactly that.

    The tensors are read-only views of the payload's bytes (no copy): the server parks them on disk and
    drops them, a node copies them into its model."""
    if not isinstance(payload.data, np.ndarray) or payload.data.dtype != np.uint8 or payload.data.ndim != 1:
        raise CodecError(f"payload bytes must be a 1-D uint8 array, got {getattr(payload.data, 'dtype', '?')}")
    codec = payload.layout.get("codec")
    if codec != "fp32":
        raise CodecError(f"unknown codec {codec!r}")
    check_layout(payload, expected)
    need = 4 * sum(_numel(s) for _, s in expected)
    if payload.nbytes != need:
        raise CodecError(f"payload has {payload.nbytes} bytes, its layout needs {need}"
                         f" ({'truncated' if payload.nbytes < need else 'oversized'})")
    with warnings.catch_warnings():  # the bytes may be immutable: nobody writes through these views
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(payload.data.view(np.float32))
    out, offset = {}, 0
    for name, shape in expected:
        n = _numel(shape)
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    return out
