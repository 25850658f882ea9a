"""How named tensors travel: encoded into one flat `uint8` byte array plus a JSON-able layout, and back.

Engine-free (no Flower): `records.py` only wraps a `Payload` into a record, and the in-process engine hands it
over as is, so both engines decode the same bytes. The codecs trade precision for bytes (float casts, per-block
int8/int4/2-bit, chunked top-k). Decoding is the first check of an untrusted reply: the layout must
name exactly the tensors and shapes the receiver expects and the byte count must be exactly what it needs, before
anything is allocated. Nothing is pickled; dtypes and shapes come from the receiver, never from the sender.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

Layout = list[tuple[str, tuple[int, ...]]]  # (name, shape), sorted by name

# ---------------------------------------------------------------------------------------------------------
# The byte layout. The tensors follow each other in name order, each encoded on its own (blocks and chunks
# never straddle two tensors) as one or more streams; each stream is padded with zero bytes to a multiple of
# 4, so every stream starts aligned for its dtype. Numbers are little-endian. For a tensor of n elements,
# with b = block_size, nb = ceil(n / b) and pad4(x) = 4 * ceil(x / 4), the streams and their bytes are:
#
#   fp32, bf16, fp16  the n values cast (round to nearest even)             4n, pad4(2n), pad4(2n)
#   int8              nb fp32 scales s; n bytes q + 128                      4nb + pad4(n)
#   int4              nb fp32 scales s; ceil(n/2) bytes, element 2i in the   4nb + pad4(ceil(n/2))
#                     low nibble of byte i and 2i+1 in the high one, q + 8
#   2bit sign         nb fp32 scales hi; ceil(n/4) bytes, element 4i+j in    4nb + pad4(ceil(n/4))
#                     bits 2j..2j+1 of byte i
#   2bit codebook     nb (lo, hi) fp32 pairs; the same ceil(n/4) bytes       8nb + pad4(ceil(n/4))
#   topk              K indices, then the K kept values encoded as one       pad4(ceil(sum of EF bits / 8))
#                     tensor of K elements by the value codec                + (value codec's bytes for K)
#
# int8/int4: symmetric per-block absmax, no clipping: s = max|x| / L with L = 127 or 7, q = x / s rounded to
# an integer in [-L, L]; element = q * s. The unused code 0 decodes to -(L + 1) * s, harmless. Rounding is to
# nearest even, or stochastic: floor(x / s + u), u uniform in [0, 1) from numpy's PCG64 seeded by `encode`'s
# seed, drawn tensor after tensor, so E[element] = x and the same seed gives the same bytes.
# 2bit: code c decodes to (lo, -lo, hi, -hi)[c] of its block: bit 1 picks the magnitude, bit 0 the sign.
#   sign: lo = 0, so an element is 0 or ±hi (ternary, as TernGrad and QSGD with one level): nearest keeps
#   every non-zero element's sign at hi = mean |x| over the block's non-zero elements (the L2-optimal scale
#   for that sign pattern, EF-signSGD's scaled sign with zeros kept as zeros); stochastic sends
#   hi = max |x| and keeps an element with probability |x| / hi (TernGrad), which is unbiased.
#   codebook: four levels ±lo, ±hi per block, each bin sent as its mean as in SparseLoCo's 2-bit quantiser of
#   the kept values (there per tensor): nearest splits the block at t = mean non-zero |x| and sends the mean
#   |x| of each side (one Lloyd step, L2-optimal for that split); stochastic sends the uniform grid
#   hi = max |x|, lo = hi / 3 and rounds each element to one of its two neighbouring levels, unbiased.
# topk: each tensor is cut into chunks of `chunk` elements (the last may be shorter); a chunk of c elements
# keeps its k(c) = max(1, floor(density * c + 1/2)) largest |x| (ties to the lower index, NaN as largest),
# sent as chunk-local indices in strictly increasing order, chunk after chunk; K = sum of k over the chunks.
# Indices travel Elias-Fano coded, chunk by chunk: with l = floor(log2(c / k)) (0 when k = c), a chunk's
# k low parts (index mod 2^l, l bits each) come first, then its upper bitmap of k + floor((c - 1) / 2^l) + 1
# bits in which bit floor(i_j / 2^l) + j is set for the j-th index. Every chunk's bits follow each other and
# are packed into bytes least significant bit first (the last byte padded with 0). That is within 10% of
# the log2(c choose k) bits any code needs for a set of k indices in c (8 bits an index at SparseLoCo's 64
# of 4096, where fixed-width indices take 12), and its size still depends only on c and k.
# Every size depends only on the layout, so a receiver checks the byte count before decoding anything.
# ---------------------------------------------------------------------------------------------------------

CODECS = ("fp32", "bf16", "fp16", "int8", "int4", "2bit", "topk")
_PARAMS = {"fp32": (), "bf16": (), "fp16": (), "int8": ("block_size", "stochastic"),
           "int4": ("block_size", "stochastic"), "2bit": ("block_size", "stochastic", "two_bit"),
           "topk": ("density", "chunk", "values")}  # what a layout records, beside codec and tensors
SLAB = 1 << 20        # elements handled at once: every temporary is O(SLAB), whatever the model's size
MAX_BLOCK = 1 << 20
MAX_CHUNK = 1 << 16


class CodecError(ValueError):
    """A payload that cannot be decoded into what the receiver expects (the reason says why)."""


@dataclass(frozen=True)
class CodecSpec:
    """What `encode` does; the fields a codec uses (`params`) travel in the layout so the receiver can decode."""

    name: str = "fp32"         # fp32 | bf16 | fp16 | int8 | int4 | 2bit | topk
    density: float = 0.02      # topk: fraction of each chunk kept, in (0, 1]
    values: str = "fp32"       # topk: codec of the kept values (any but topk)
    chunk: int = 4096          # topk: elements per chunk (SparseLoCo's 64x64 tiles), <= 65536
    block_size: int = 256      # int8/int4/2bit: consecutive elements sharing a scale, <= 2**20
    stochastic: bool = False   # int8/int4/2bit: unbiased stochastic rounding seeded by `encode`'s seed
    two_bit: str = "codebook"  # 2bit: "codebook" (±lo, ±hi) or "sign" (0 or ±hi)

    @classmethod
    def of(cls, config: Any) -> CodecSpec:
        """The spec a `config.CodecConfig` describes (the config's fields are already checked)."""
        return cls(name=config.codec, density=config.density, values=config.values, chunk=config.chunk,
                   block_size=config.block_size, stochastic=config.stochastic, two_bit=config.two_bit)

    def validate(self) -> CodecSpec:
        """Self, or ValueError naming the first bad field, its value and what it may be."""
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [("name", self.name in CODECS, f"one of {', '.join(CODECS)}"),
                  ("values", self.values in CODECS[:-1], "a codec other than topk"),
                  ("density", (is_int(self.density) or isinstance(self.density, float)) and 0 < self.density <= 1,
                   "a number in (0, 1]"),
                  ("chunk", is_int(self.chunk) and 1 <= self.chunk <= MAX_CHUNK, f"an int in 1..{MAX_CHUNK}"),
                  ("block_size", is_int(self.block_size) and 1 <= self.block_size <= MAX_BLOCK,
                   f"an int in 1..{MAX_BLOCK}"),
                  ("stochastic", isinstance(self.stochastic, bool), "true or false"),
                  ("two_bit", self.two_bit in ("sign", "codebook"), "'sign' or 'codebook'")]
        for key, ok, want in checks:
            if not ok:
                raise ValueError(f"codec {key}={getattr(self, key)!r} is invalid: it must be {want}")
        return self

    def params(self) -> dict[str, Any]:
        keys = _PARAMS[self.name] + (_PARAMS[self.values] if self.name == "topk" else ())
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_layout(cls, layout: Mapping[str, Any]) -> CodecSpec:
        """The spec a payload's layout records; CodecError unless it is a known codec with exactly its params."""
        name = layout.get("codec")
        if not isinstance(name, str) or name not in CODECS:
            raise CodecError(f"unknown codec {name!r}")
        params = {k: v for k, v in layout.items() if k not in ("codec", "tensors")}
        unknown = sorted(set(params) - {f.name for f in fields(cls)} - {"name"})
        if unknown or "name" in params:
            raise CodecError(f"payload layout has unknown keys {unknown or ['name']}")
        try:
            spec = cls(name, **params).validate()
        except ValueError as e:
            raise CodecError(f"payload layout: {e}") from None
        if set(params) != set(spec.params()):
            raise CodecError(f"payload layout of codec {name} has parameters {sorted(params)},"
                             f" expected {sorted(spec.params())}")
        return spec


def _spec(codec: str | CodecSpec) -> CodecSpec:
    return (codec if isinstance(codec, CodecSpec) else CodecSpec(codec)).validate()


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
    return math.prod(int(d) for d in shape)  # Python ints: a huge claimed shape cannot overflow


def _pad4(nbytes: int) -> int:
    return -(-nbytes // 4) * 4


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the codecs: bounded slabs, rows of a block or chunk, bit packing, zero-copy views


def _spans(n: int, unit: int) -> list[tuple[int, int]]:
    """(start, end) of slabs of about SLAB elements, each a multiple of `unit` except the last."""
    step = unit * max(1, SLAB // unit)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _rows(t: torch.Tensor, width: int) -> list[torch.Tensor]:
    """1-D `t` as 2-D views: full rows of `width`, then one shorter row for the rest (if any)."""
    m = len(t) // width * width
    return [v for v in (t[:m].view(-1, width), t[m:].view(1, -1)) if v.numel()]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", torch.float32)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2**bits, 8 // bits to a byte, the first in the lowest bits."""
    per = 8 // bits
    if per == 1:
        return codes
    codes = torch.cat([codes, codes.new_zeros(-len(codes) % per)]).view(-1, per)
    out = codes[:, 0].clone()
    for j in range(1, per):
        out |= codes[:, j] << (bits * j)
    return out


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed[:n]
    out = torch.empty(len(packed), per, dtype=torch.uint8)
    for j in range(per):
        torch.bitwise_right_shift(packed, bits * j, out=out[:, j])
    return out.view(-1)[:n].bitwise_and_((1 << bits) - 1)


def _view(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A read-only torch view of payload bytes (no copy); nobody writes through it."""
    with warnings.catch_warnings():  # the bytes may be immutable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data).view(dtype)


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------------
# The codecs: each says how many bytes each of its streams takes for n elements (`sizes`), turns a flat
# tensor into those streams (`encode`, a list of tensors per stream) and a tensor's streams back (`decode`).


class _Cast:
    """fp32 (bit-exact; decoded as a zero-copy view), bf16, fp16 (torch's round-to-nearest-even casts)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.itemsize = dtype, torch.empty(0, dtype=dtype).element_size()

    def sizes(self, n: int) -> list[int]:
        return [n * self.itemsize]

    def encode(self, x: torch.Tensor, gen: np.random.Generator | None) -> list[list[torch.Tensor]]:
        return [[x.to("cpu", self.dtype)]]  # fp32 in, fp32 out: the tensor itself, copied only by the join

    def decode(self, streams: list[np.ndarray], n: int) -> torch.Tensor:
        values = _view(streams[0], self.dtype)
        return values if self.dtype == torch.float32 else torch.empty(n).copy_(values)


def _uniform(gen: np.random.Generator, shape: torch.Size) -> torch.Tensor:
    """Uniform [0, 1) floats; numpy's PCG64 draws them several times faster than torch's CPU generator."""
    return torch.from_numpy(gen.random(math.prod(shape), dtype=np.float32)).view(shape)


def _round(y: torch.Tensor, gen: np.random.Generator | None) -> torch.Tensor:
    """To an integer in place: nearest, or down/up with probabilities that make it unbiased."""
    return y.round_() if gen is None else y.add_(_uniform(gen, y.shape)).floor_()


class _Uniform:
    """int8 (L = 127) and int4 (L = 7): s = max|x| / L per block, codes q + L + 1 with q in [-L, L]."""

    n_scales = 1

    def __init__(self, bits: int):
        self.bits, self.levels = bits, (1 << (bits - 1)) - 1

    def quantise(self, x: torch.Tensor, gen: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        amax = x.abs().amax(1, keepdim=True)
        y = x * torch.where(amax > 0, self.levels / amax, 0.0)
        q = _round(y, gen).clamp_(-self.levels, self.levels).add_(self.levels + 1)
        return amax / self.levels, q.to(torch.uint8)

    def dequantise(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(codes).sub_(self.levels + 1).mul_(scales)


class _TwoBit:
    """2 bits per element; code c decodes to (lo, -lo, hi, -hi)[c] of its block."""

    bits = 2

    @staticmethod
    def codes(big: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return torch.add(negative.view(torch.uint8), big.view(torch.uint8), alpha=2)  # bools are 0/1 bytes

    def dequantise(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        lo, hi = self.levels(scales)
        table = torch.cat([lo, -lo, hi, -hi], 1).view(-1)
        at = codes.to(torch.int32) + torch.arange(0, len(table), 4, dtype=torch.int32).view(-1, 1)
        torch.index_select(table, 0, at.view(-1), out=out.view(-1))  # int32 indices: faster than gather


def _mean_nonzero(a: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    return a.sum(1, keepdim=True) / nonzero.sum(1, keepdim=True, dtype=torch.int32).clamp_(min=1)


class _SignTwoBit(_TwoBit):
    """0 or ±hi per element (lo = 0 is not sent)."""

    n_scales = 1

    def levels(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(scales), scales

    def quantise(self, x: torch.Tensor, gen: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        a = x.abs()
        if gen is None:  # the sign pattern's L2-optimal scale
            keep = a > 0
            hi = _mean_nonzero(a, keep)
        else:  # TernGrad: kept with probability |x| / max|x|
            hi = a.amax(1, keepdim=True)
            keep = _uniform(gen, a.shape).mul_(hi) < a
        return hi, self.codes(keep, x < 0)


class _CodebookTwoBit(_TwoBit):
    """±lo or ±hi per element, (lo, hi) sent per block."""

    n_scales = 2

    def levels(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scales[:, :1], scales[:, 1:]

    def quantise(self, x: torch.Tensor, gen: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        a = x.abs()
        if gen is None:  # split at the mean non-zero magnitude, each side at its mean (one Lloyd step)
            big = a > _mean_nonzero(a, a > 0)
            n_big = big.sum(1, keepdim=True, dtype=torch.int32)
            big_sum = (a * big).sum(1, keepdim=True)
            lo = (a.sum(1, keepdim=True) - big_sum) / (a.shape[1] - n_big).clamp_(min=1)
            hi, negative = big_sum / n_big.clamp(min=1), x < 0
        else:  # grid ±hi/3, ±hi; hi - lo = 2 lo, so one draw r in [0, 2 lo) picks either neighbour
            hi = a.amax(1, keepdim=True)
            lo = hi / 3
            r = _uniform(gen, a.shape).mul_(2 * lo)
            big = r < a - lo       # |x| > lo: hi with probability (|x| - lo) / (hi - lo)
            negative = r >= x + lo  # |x| <= lo: -lo with probability (lo - x) / 2 lo; else the sign of x
        return torch.cat([lo, hi], 1), self.codes(big, negative)


class _Blockwise:
    """int8, int4, 2bit: `block` consecutive elements share the quantiser's fp32 scales."""

    def __init__(self, quantiser: _Uniform | _TwoBit, block: int):
        self.q, self.block = quantiser, block
        self.unit = math.lcm(block, 4)  # slabs start on a block and on a byte of packed codes

    def sizes(self, n: int) -> list[int]:
        return [4 * self.q.n_scales * -(-n // self.block), -(-n * self.q.bits // 8)]

    def encode(self, x: torch.Tensor, gen: np.random.Generator | None) -> list[list[torch.Tensor]]:
        scales, codes = [], []
        for s, e in _spans(len(x), self.unit):
            got = [self.q.quantise(rows, gen) for rows in _rows(_f32(x[s:e]), self.block)]
            scales += [sc.reshape(-1) for sc, _ in got]
            codes.append(_pack(torch.cat([c.reshape(-1) for _, c in got]), self.q.bits))
        return [scales, codes]

    def decode(self, streams: list[np.ndarray], n: int) -> torch.Tensor:
        scales = _view(streams[0], torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError("a block scale is negative or not finite")
        scales, packed, bits = scales.view(-1, self.q.n_scales), _view(streams[1], torch.uint8), self.q.bits
        out = torch.empty(n)
        for s, e in _spans(n, self.unit):
            codes = _unpack(packed[s * bits // 8:-(-e * bits // 8)], bits, e - s)
            rows = _rows(out[s:e], self.block)
            block_scales = scales[s // self.block:-(-e // self.block)].split([len(r) for r in rows])
            for o, c, sc in zip(rows, _rows(codes, self.block), block_scales):
                self.q.dequantise(c, sc, o)
        return out


def _top_indices(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest |x| of each row, ascending. torch.topk leaves ties unspecified, so
    rows where more than k elements reach the threshold are redone: ties go to the lower index."""
    m, width = rows.shape
    if k == width:
        return torch.arange(width).expand(m, width)
    a = rows.abs().nan_to_num_(nan=math.inf, posinf=math.inf)  # NaN counts as largest, deterministically
    top = a.topk(k, dim=1, sorted=False)
    threshold = top.values.amin(1, keepdim=True)
    idx = top.indices.sort(1).values
    tied = ((a >= threshold).sum(1, dtype=torch.int32) > k).nonzero().squeeze(1)
    if len(tied):
        a, t = a[tied], threshold[tied]
        above, at = a > t, a == t
        keep = above | (at & (at.cumsum(1) <= k - above.sum(1, keepdim=True)))
        idx[tied] = keep.nonzero()[:, 1].view(-1, k)
    return idx


def _elias_fano_shape(width: int, k: int) -> tuple[int, int]:
    """(l, bits) of a chunk of `width` elements keeping k: low-part width and the chunk's coded bit count."""
    low = max(0, (width // k).bit_length() - 1)
    return low, k * low + k + ((width - 1) >> low) + 1


def _elias_fano_bits(idx: np.ndarray, width: int) -> np.ndarray:
    """The coded bits (one uint8 per bit) of each row of ascending chunk-local indices, one row per chunk."""
    m, k = idx.shape
    low, bits = _elias_fano_shape(width, k)
    low_parts = ((idx[:, :, None] >> np.arange(low)) & 1).astype(np.uint8).reshape(m, k * low)
    upper = np.zeros((m, bits - k * low), np.uint8)
    np.put_along_axis(upper, (idx >> low) + np.arange(k), 1, axis=1)
    return np.concatenate([low_parts, upper], 1)


def _elias_fano_indices(bits: np.ndarray, width: int, k: int) -> np.ndarray:
    """Rows of chunk-local indices back from their coded bits; CodecError unless each row is k strictly
    increasing indices below `width`."""
    m = len(bits)
    low, _ = _elias_fano_shape(width, k)
    upper = bits[:, k * low:]
    if bool((upper.sum(1, dtype=np.int64) != k).any()):
        raise CodecError("topk indices are malformed: a chunk's upper bitmap does not hold exactly its k indices")
    high = np.nonzero(upper)[1].reshape(m, k) - np.arange(k)
    low_parts = (bits[:, :k * low].reshape(m, k, low).astype(np.int64) << np.arange(low)).sum(2)
    idx = (high << low) | low_parts
    if not bool((idx[:, 1:] > idx[:, :-1]).all()) or int(idx[:, -1].max(initial=0)) >= width:
        raise CodecError("topk indices are out of range or not strictly increasing within a chunk")
    return idx


class _TopK:
    """Per chunk the k largest |x| as Elias-Fano coded chunk-local indices; their values through another codec."""

    def __init__(self, density: float, chunk: int, values: _Cast | _Blockwise):
        self.density, self.chunk, self.values = density, chunk, values

    def k(self, width: int) -> int:
        return min(width, max(1, math.floor(self.density * width + 0.5)))

    def _over_chunks(self, n: int, per_chunk: Callable[[int], int]) -> int:
        """The sum of `per_chunk(width)` over the chunks of an n-element tensor."""
        full, rest = divmod(n, self.chunk)
        return full * per_chunk(self.chunk) + (per_chunk(rest) if rest else 0)

    def kept(self, n: int) -> int:
        return self._over_chunks(n, self.k)

    def index_bits(self, n: int) -> int:
        return self._over_chunks(n, lambda width: _elias_fano_shape(width, self.k(width))[1])

    def sizes(self, n: int) -> list[int]:
        return [-(-self.index_bits(n) // 8)] + self.values.sizes(self.kept(n))

    def encode(self, x: torch.Tensor, gen: np.random.Generator | None) -> list[list[torch.Tensor]]:
        bits, values = [np.zeros(0, np.uint8)], [torch.empty(0)]
        for s, e in _spans(len(x), self.chunk):
            for rows in _rows(_f32(x[s:e]), self.chunk):
                idx = _top_indices(rows, self.k(rows.shape[1]))
                bits.append(_elias_fano_bits(idx.numpy(), rows.shape[1]).reshape(-1))
                values.append(rows.gather(1, idx).reshape(-1))
        packed = torch.from_numpy(np.packbits(np.concatenate(bits), bitorder="little"))
        return [[packed]] + self.values.encode(torch.cat(values), gen)

    def decode(self, streams: list[np.ndarray], n: int) -> torch.Tensor:
        kept = self.kept(n)
        bits = np.unpackbits(np.asarray(streams[0], np.uint8), count=self.index_bits(n), bitorder="little")
        values = self.values.decode(streams[1:], kept)
        out, at, bit = torch.zeros(n), 0, 0
        for s, e in _spans(n, self.chunk):
            for rows in _rows(out[s:e], self.chunk):
                m, width = rows.shape
                k = self.k(width)
                size = _elias_fano_shape(width, k)[1]
                idx = _elias_fano_indices(bits[bit:bit + m * size].reshape(m, size), width, k)
                rows.scatter_(1, torch.from_numpy(idx), values[at:at + m * k].view(m, k))
                at, bit = at + m * k, bit + m * size
        return out


def _codec(spec: CodecSpec) -> _Cast | _Blockwise | _TopK:
    casts = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if spec.name == "topk":
        return _TopK(spec.density, spec.chunk, _codec(replace(spec, name=spec.values)))
    if spec.name in casts:
        return _Cast(casts[spec.name])
    if spec.name == "2bit":
        return _Blockwise(_SignTwoBit() if spec.two_bit == "sign" else _CodebookTwoBit(), spec.block_size)
    return _Blockwise(_Uniform(8 if spec.name == "int8" else 4), spec.block_size)


def _stream_sizes(codec: _Cast | _Blockwise | _TopK, layout: Layout) -> list[list[int]]:
    return [codec.sizes(_numel(shape)) for _, shape in layout]


def _total(sizes: list[list[int]]) -> int:
    return sum(_pad4(b) for stream_sizes in sizes for b in stream_sizes)


def payload_nbytes(spec: CodecSpec, layout: Layout) -> int:
    """The exact byte count of a payload of `layout` under `spec` (it depends only on the shapes)."""
    return _total(_stream_sizes(_codec(spec), layout))


# ---------------------------------------------------------------------------------------------------------
# Encode and decode a set of named tensors


def laid_out(layout: Layout) -> dict[str, torch.Tensor]:
    """Uninitialised fp32 tensors named and shaped as `layout`, back to back in one buffer exactly as fp32
    `encode` lays them out: filled in place, they encode without a copy."""
    flat = torch.empty(sum(_numel(shape) for _, shape in layout), dtype=torch.float32)
    out, at = {}, 0
    for name, shape in sorted(layout):
        out[name] = flat[at:at + _numel(shape)].view(shape)
        at += _numel(shape)
    return out


def as_laid_out(tensors: Mapping[str, torch.Tensor], names: list[str] | None = None) -> np.ndarray | None:
    """The bytes (writable, 1-D uint8) of the one fp32 buffer `tensors` fill back to back in `names` order
    (default: sorted, as `laid_out` makes them), or None if they are anything else."""
    names = sorted(tensors) if names is None else names
    first = tensors[names[0]] if names else None
    flat = first._base if first is not None and first._base is not None else first
    if flat is None or flat.dtype != torch.float32 or flat.device.type != "cpu" or not flat.is_contiguous():
        return None
    at = flat.data_ptr()
    for name in names:
        t = tensors[name]
        if t._base is not flat or t.dtype != torch.float32 or not t.is_contiguous():
            return None
        if t.numel() and t.data_ptr() != at:  # an empty view may point anywhere
            return None
        at += t.numel() * 4
    if at != flat.data_ptr() + flat.numel() * 4:
        return None
    return flat.view(torch.uint8).numpy()


def encode(tensors: Mapping[str, torch.Tensor], codec: str | CodecSpec = "fp32", *, seed: int = 0) -> Payload:
    """Encode `tensors` (any float dtype; sorted by name) with `codec`; stochastic rounding draws from `seed`.

    Works a slab at a time: the peak beyond the input is the encoded parts, their join, and O(SLAB); fp32
    tensors made by `laid_out` are their own payload (no copy)."""
    spec = _spec(codec)
    impl = _codec(spec)
    gen = np.random.default_rng(seed) if spec.stochastic else None
    names = sorted(tensors)
    layout = {"codec": spec.name, **spec.params(), "tensors": [[n, list(tensors[n].shape)] for n in names]}
    if spec.name == "fp32" and (data := as_laid_out(tensors, names)) is not None:
        return Payload(layout, data)
    parts: list[Any] = []
    for name in names:
        for stream in impl.encode(tensors[name].detach().reshape(-1), gen):
            parts += [_as_bytes(t) for t in stream]
            parts.append(bytes(-sum(t.numel() * t.element_size() for t in stream) % 4))
    buffer = b"".join(parts)  # the one copy: straight into the bytes a transport sends
    return Payload.over(layout, buffer)


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

    fp32 tensors are read-only views of the payload's bytes (no copy): the server parks them on disk and
    drops them, a node copies them into its model. Other codecs decode into new tensors, a slab at a time."""
    if not isinstance(payload.data, np.ndarray) or payload.data.dtype != np.uint8 or payload.data.ndim != 1:
        raise CodecError(f"payload bytes must be a 1-D uint8 array, got {getattr(payload.data, 'dtype', '?')}")
    if not isinstance(payload.layout, dict):
        raise CodecError("payload layout is not a JSON object")
    spec = CodecSpec.from_layout(payload.layout)
    check_layout(payload, expected)
    impl = _codec(spec)
    sizes = _stream_sizes(impl, expected)
    need = _total(sizes)
    if payload.nbytes != need:
        raise CodecError(f"payload has {payload.nbytes} bytes, its layout ({spec.name}) needs {need}"
                         f" ({'truncated' if payload.nbytes < need else 'oversized'})")
    out, at = {}, 0
    for (name, shape), stream_sizes in zip(expected, sizes):
        streams = []
        for b in stream_sizes:
            streams.append(payload.data[at:at + b])
            at += _pad4(b)
        try:
            out[name] = impl.decode(streams, _numel(shape)).view(shape)
        except CodecError as e:
            raise CodecError(f"tensor {name!r}: {e}") from None
    return out
