"""The codecs: every codec round-trips against a numpy reference that reads and writes the byte layout the
module documents, sizes follow the documented formula, stochastic rounding is unbiased and seeded, top-k keeps
exactly the largest entries per chunk, and every malformed payload is a CodecError (a rejected reply)."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from photon.federation import codec
from photon.federation.codec import (
    CodecError,
    CodecSpec,
    Payload,
    decode,
    encode,
    layout_of,
)
from tests.helpers import encoded_size

# ---------------------------------------------------------------------------------------------------------
# The numpy reference: written from the module's layout comment, not from its code

LEVELS = {"int8": 127, "int4": 7}
BITS = {"int8": 8, "int4": 4, "2bit": 2}


def pad4(n):
    return -(-n // 4) * 4


def keep_count(spec, width):
    return min(width, max(1, math.floor(spec.density * width + 0.5)))


def chunks(n, width):
    return [(s, min(s + width, n)) for s in range(0, n, width)]


def value_spec(spec):
    return CodecSpec(spec.values, block_size=spec.block_size, two_bit=spec.two_bit)


def ref_pack(codes, bits):
    per = 8 // bits
    grouped = np.zeros(-(-len(codes) // per) * per, np.uint8)
    grouped[:len(codes)] = codes
    grouped = grouped.reshape(-1, per)
    return np.bitwise_or.reduce([grouped[:, j] << (bits * j) for j in range(per)])


def ref_unpack(packed, bits, n):
    per = 8 // bits
    return np.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], 1).reshape(-1)[:n]


def ref_bf16(x):
    """Round to nearest even on the fp32 bits (finite x)."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def ref_quantise(block, spec):
    """(scales, codes) of one block, deterministic rounding."""
    a = np.abs(block)
    if spec.name in LEVELS:
        levels, amax = LEVELS[spec.name], a.max()
        inv = np.float32(levels) / amax if amax > 0 else np.float32(0)
        q = np.clip(np.rint(block * inv), -levels, levels)
        return [amax / np.float32(levels)], q + levels + 1
    negative = (block < 0).astype(np.uint8)
    t = a[a > 0].mean(dtype=np.float64) if (a > 0).any() else 0.0
    if spec.two_bit == "sign":
        return [t], 2 * (a > 0) + negative
    big = a > t
    lo = a[~big].mean(dtype=np.float64) if (~big).any() else 0.0
    hi = a[big].mean(dtype=np.float64) if big.any() else 0.0
    return [lo, hi], 2 * big + negative


def ref_low_bits(width, k):
    """l = floor(log2(width / k)), by search rather than bit tricks."""
    low = 0
    while k * 2 ** (low + 1) <= width:
        low += 1
    return low


def ref_elias_fano(chunk_indices, widths):
    """Elias-Fano bytes of each chunk's ascending indices, bit by bit: low parts, then the upper bitmap."""
    bits = []
    for idx, width in zip(chunk_indices, widths):
        k, low = len(idx), ref_low_bits(width, len(idx))
        for i in idx:
            bits += [(int(i) >> b) & 1 for b in range(low)]
        upper = [0] * (k + (width - 1) // 2 ** low + 1)
        for j, i in enumerate(idx):
            upper[int(i) // 2 ** low + j] = 1
        bits += upper
    bits += [0] * (-len(bits) % 8)
    return np.array([sum(bits[8 * b + j] << j for j in range(8)) for b in range(len(bits) // 8)], np.uint8)


def ref_elias_fano_nbytes(widths, ks):
    total = sum(k * ref_low_bits(w, k) + k + (w - 1) // 2 ** ref_low_bits(w, k) + 1 for w, k in zip(widths, ks))
    return -(-total // 8)


def ref_elias_fano_decode(data, widths, ks):
    bits = [(int(b) >> j) & 1 for b in data for j in range(8)]
    out, at = [], 0
    for width, k in zip(widths, ks):
        low = ref_low_bits(width, k)
        lows = [sum(bits[at + j * low + b] << b for b in range(low)) for j in range(k)]
        at += k * low
        size = k + (width - 1) // 2 ** low + 1
        ones = [p for p in range(size) if bits[at + p]]
        at += size
        out.append(np.array([(p - j) * 2 ** low + lo for j, (p, lo) in enumerate(zip(ones, lows))], int))
    return out


def ref_topk(x, spec):
    idx, vals = [], []
    for s, e in chunks(len(x), spec.chunk):
        a = np.nan_to_num(np.abs(x[s:e]), nan=np.inf)
        top = np.sort(np.argsort(-a, kind="stable")[:keep_count(spec, e - s)])
        idx.append(top)
        vals.append(x[s:e][top])
    return np.concatenate(idx or [np.zeros(0, int)]), np.concatenate(vals or [np.zeros(0, np.float32)])


def ref_streams(x, spec):
    """The streams of one flat float32 tensor, as numpy arrays in their wire dtype."""
    if spec.name == "fp32":
        return [x.astype("<f4")]
    if spec.name == "fp16":
        return [x.astype("<f2")]
    if spec.name == "bf16":
        return [ref_bf16(x)]
    if spec.name == "topk":
        idx, vals = ref_topk(x, spec)
        widths = [e - s for s, e in chunks(len(x), spec.chunk)]
        packed = ref_elias_fano(np.split(idx, np.cumsum([keep_count(spec, w) for w in widths])[:-1]), widths)
        return [packed] + ref_streams(vals.astype(np.float32), value_spec(spec))
    got = [ref_quantise(x[s:e], spec) for s, e in chunks(len(x), spec.block_size)]
    scales = np.array([s for sc, _ in got for s in sc], "<f4")
    codes = np.concatenate([c for _, c in got] or [np.zeros(0)]).astype(np.uint8)
    return [scales, ref_pack(codes, BITS[spec.name])]


def ref_encode(arrays, spec):
    out = b""
    for name in sorted(arrays):
        for stream in ref_streams(arrays[name].reshape(-1).astype(np.float32), spec):
            out += stream.tobytes() + bytes(pad4(stream.nbytes) - stream.nbytes)
    return out


class Reader:
    def __init__(self, buf):
        self.buf, self.at = bytes(buf), 0

    def take(self, count, dtype):
        arr = np.frombuffer(self.buf, dtype, count, self.at)
        self.at += pad4(arr.nbytes)
        return arr


def ref_decode_flat(r, n, spec):
    if spec.name in ("fp32", "fp16"):
        return r.take(n, "<f4" if spec.name == "fp32" else "<f2").astype(np.float32)
    if spec.name == "bf16":
        return (r.take(n, "<u2").astype(np.uint32) << 16).view(np.float32)
    if spec.name == "topk":
        widths = [e - s for s, e in chunks(n, spec.chunk)]
        ks = [keep_count(spec, w) for w in widths]
        idx = np.concatenate([np.zeros(0, int)] + ref_elias_fano_decode(r.take(ref_elias_fano_nbytes(widths, ks),
                                                                               np.uint8), widths, ks))
        vals = ref_decode_flat(r, sum(ks), value_spec(spec))
        out, at = np.zeros(n, np.float32), 0
        for (s, _), k in zip(chunks(n, spec.chunk), ks):
            out[s + idx[at:at + k]] = vals[at:at + k]
            at += k
        return out
    per_block = 2 if spec.name == "2bit" and spec.two_bit == "codebook" else 1
    nb = -(-n // spec.block_size)
    scales = r.take(nb * per_block, "<f4").reshape(nb, per_block)
    codes = ref_unpack(r.take(-(-n * BITS[spec.name] // 8), np.uint8), BITS[spec.name], n)
    block = np.arange(n) // spec.block_size
    if spec.name in LEVELS:
        return (codes.astype(np.float32) - np.float32(LEVELS[spec.name] + 1)) * scales[block, 0]
    lo = scales[:, 0] if per_block == 2 else np.zeros(nb, np.float32)
    table = np.stack([lo, -lo, scales[:, -1], -scales[:, -1]], 1)
    return table[block, codes]


def ref_decode(buf, layout, spec):
    r = Reader(buf)
    out = {name: ref_decode_flat(r, math.prod(shape), spec).reshape(shape) for name, shape in layout}
    assert r.at == len(r.buf)
    return out


def formula_nbytes(n, spec):
    """The payload size per tensor as the module header states it."""
    nb = -(-n // spec.block_size)
    if spec.name == "topk":
        kept = sum(keep_count(spec, e - s) for s, e in chunks(n, spec.chunk))
        widths = [e - s for s, e in chunks(n, spec.chunk)]
        return pad4(ref_elias_fano_nbytes(widths, [keep_count(spec, w) for w in widths])) + \
            formula_nbytes(kept, value_spec(spec))
    return {"fp32": 4 * n, "bf16": pad4(2 * n), "fp16": pad4(2 * n), "int8": 4 * nb + pad4(n),
            "int4": 4 * nb + pad4(-(-n // 2)),
            "2bit": 4 * nb * (2 if spec.two_bit == "codebook" else 1) + pad4(-(-n // 4))}[spec.name]


# ---------------------------------------------------------------------------------------------------------
# Fixtures

def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(37, 29, generator=g), "s": torch.randn((), generator=g), "e": torch.randn(0),
            "e2": torch.randn(3, 0), "odd": torch.randn(7, generator=g) * 1e-3,
            "v": torch.randn(5000, generator=g) * torch.rand(5000, generator=g)}  # > one default topk chunk


SPECS = [CodecSpec("fp32"), CodecSpec("bf16"), CodecSpec("fp16"), CodecSpec("int8"), CodecSpec("int8", block_size=7),
         CodecSpec("int4"), CodecSpec("int4", block_size=5), CodecSpec("2bit", block_size=64),
         CodecSpec("2bit", block_size=33, two_bit="codebook"), CodecSpec("topk", density=0.02, chunk=64),
         CodecSpec("topk", density=0.05, chunk=100, values="int8", block_size=16),
         CodecSpec("topk", density=0.1, values="2bit", block_size=8, two_bit="codebook"),
         CodecSpec("topk", density=0.03, values="2bit"), CodecSpec("topk", density=0.02, values="int4"),
         CodecSpec("topk", density=1.0, chunk=10, values="bf16"), CodecSpec("topk", density=0.01, chunk=4500)]


def _ids(spec):
    return "-".join([spec.name] + [f"{k}={v}" for k, v in spec.params().items()])


def _np(tensors):
    return {k: v.numpy() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------
# Round trips against the reference


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_every_codec_matches_the_numpy_reference(spec):
    tensors = _tensors()
    layout = layout_of(tensors)
    payload = encode(tensors, spec)
    got = decode(payload, layout)
    # the decoder reads the bytes exactly as the documented layout says
    ref = ref_decode(payload.as_bytes(), layout, spec)
    for name, shape in layout:
        assert got[name].dtype == torch.float32 and tuple(got[name].shape) == shape
        np.testing.assert_array_equal(got[name].numpy(), ref[name], err_msg=name)
    # and the encoder writes what the reference writes (2-bit scales are float sums: equal up to rounding)
    expected = ref_decode(ref_encode(_np(tensors), spec), layout, spec)
    two_bit = "2bit" in (spec.name, spec.values if spec.name == "topk" else "")
    for name in expected:
        np.testing.assert_allclose(ref[name], expected[name], rtol=1e-6 if two_bit else 0, atol=0, err_msg=name)
    if not two_bit:
        assert payload.as_bytes() == ref_encode(_np(tensors), spec)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_payload_size_is_the_documented_formula(spec):
    tensors = _tensors()
    want = sum(formula_nbytes(t.numel(), spec) for t in tensors.values())
    assert encode(tensors, spec).nbytes == want


def test_sparselocos_indices_take_eight_bits_each():
    """64 of each 4,096 (1/64): Elias-Fano sends 6 low bits and 2 bits of upper bitmap an index."""
    spec = CodecSpec("topk", density=1 / 64, chunk=4096)
    assert encoded_size([("w", (4 * 4096,))], spec) == 4 * (64 + 64 * 4)


def test_compression_ratios_for_a_large_tensor_follow_from_the_formula():
    layout = [("w", (1 << 20,))]
    ratio = {name: 4 * (1 << 20) / encoded_size(layout, spec) for name, spec in {
        "bf16": CodecSpec("bf16"), "int8": CodecSpec("int8"), "int4": CodecSpec("int4"), "2bit": CodecSpec("2bit"),
        "2bit-sign": CodecSpec("2bit", two_bit="sign"),
        "topk1%+2bit": CodecSpec("topk", density=0.01, values="2bit")}.items()}
    assert ratio["bf16"] == 2 and 3.9 < ratio["int8"] < 4 and 7.7 < ratio["int4"] < 8
    assert 14 < ratio["2bit"] < 14.3 and 15 < ratio["2bit-sign"] < 16  # codebook: two fp32 levels per block
    assert ratio["topk1%+2bit"] > 280  # about 8.6 bits an index (Elias-Fano) + 2 per value, plus scales


def test_fp32_is_bit_exact_zero_copy_and_keeps_its_layout():
    tensors = _tensors()
    tensors["w"][0, 0], tensors["w"][0, 1] = float("nan"), float("-inf")
    payload = encode(tensors)
    assert payload.layout == {"codec": "fp32", "tensors": [[n, list(s)] for n, s in layout_of(tensors)]}
    assert payload.buffer is not None and payload.as_bytes() is payload.buffer
    got = decode(payload, layout_of(tensors))
    lo = payload.data.ctypes.data
    for name, t in tensors.items():
        assert got[name].numpy().tobytes() == t.numpy().tobytes()
        if t.numel():
            assert lo <= got[name].data_ptr() < lo + payload.nbytes  # a view of the payload, not a copy


def test_tensors_laid_out_like_the_fp32_payload_are_their_own_payload():
    tensors = _tensors()
    slab = codec.laid_out(layout_of(tensors))
    for name, t in tensors.items():
        slab[name].copy_(t)
    joined, own = encode(tensors), encode(slab)
    assert own.layout == joined.layout and np.array_equal(own.data, joined.data)
    assert own.buffer is None and own.data.ctypes.data == slab["w"]._base.data_ptr()  # no copy: the slab's bytes
    # Anything else is joined as before: one tensor replaced, a subset, another codec
    replaced = {**slab, "w": slab["w"].clone()}
    assert encode(replaced).buffer is not None and np.array_equal(encode(replaced).data, joined.data)
    subset = {k: v for k, v in slab.items() if k != sorted(slab)[-1]}
    assert encode(subset).buffer is not None
    assert encode(slab, "bf16").layout["codec"] == "bf16"


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float_casts_equal_torch_casts(name, dtype):
    tensors = _tensors()
    tensors["w"][1, 1], tensors["w"][2, 2] = float("nan"), 1e6  # fp16 overflows to inf, as torch does
    got = decode(encode(tensors, name), layout_of(tensors))
    for k, t in tensors.items():
        torch.testing.assert_close(got[k], t.to(dtype).float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("int8", "int4", "2bit", "topk")], ids=_ids)
def test_slabs_do_not_change_the_bytes(spec, monkeypatch):
    tensors = _tensors()
    whole = encode(tensors, spec)
    monkeypatch.setattr(codec, "SLAB", 8)  # one block or chunk per slab
    sliced = encode(tensors, spec)
    assert sliced.as_bytes() == whole.as_bytes()
    for name, t in decode(sliced, layout_of(tensors)).items():
        assert torch.equal(t, decode(whole, layout_of(tensors))[name])


# ---------------------------------------------------------------------------------------------------------
# Quantisation error, rounding and seeds


def _block_absmax(x, block):
    a = x.abs()
    return torch.stack([a[s:e].max() for s, e in chunks(len(x), block)]).repeat_interleave(block)[:len(x)]


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_integer_codecs_err_by_at_most_half_a_step_or_one_step(name, stochastic):
    x = torch.randn(1000) * torch.rand(1000) ** 3
    spec = CodecSpec(name, block_size=64, stochastic=stochastic)
    got = decode(encode({"x": x}, spec, seed=3), [("x", (1000,))])["x"]
    step = _block_absmax(x, 64) / LEVELS[name]
    assert bool(((got - x).abs() <= step * (1 if stochastic else 0.5) * (1 + 1e-5)).all())


@pytest.mark.parametrize("two_bit", ["sign", "codebook"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_two_bit_keeps_signs_and_stays_within_the_block_range(two_bit, stochastic):
    x = torch.randn(1000)
    x[::7] = 0
    got = decode(encode({"x": x}, CodecSpec("2bit", block_size=64, two_bit=two_bit, stochastic=stochastic)),
                 [("x", (1000,))])["x"]
    assert bool((got.abs() <= _block_absmax(x, 64) * (1 + 1e-6)).all())
    if not (stochastic and two_bit == "codebook"):  # that one rounds |x| < lo to -lo or +lo, unbiased
        assert bool((got * x >= 0).all())
    if two_bit == "sign" and not stochastic:  # scaled sign: zeros stay zeros
        assert bool((got[x == 0] == 0).all()) and bool((got[x != 0] != 0).all())


def test_two_bit_codebook_errs_less_than_sign():
    x = {"x": torch.randn(1 << 14)}
    err = {v: float((decode(encode(x, CodecSpec("2bit", two_bit=v)), [("x", (1 << 14,))])["x"] - x["x"]).norm())
           for v in ("sign", "codebook")}
    assert err["codebook"] < 0.8 * err["sign"]


@pytest.mark.parametrize("spec", [CodecSpec("int8", block_size=50, stochastic=True),
                                  CodecSpec("int4", block_size=50, stochastic=True),
                                  CodecSpec("2bit", block_size=50, stochastic=True),
                                  CodecSpec("2bit", block_size=50, stochastic=True, two_bit="codebook")], ids=_ids)
def test_stochastic_rounding_is_unbiased_and_seeded(spec):
    x = torch.randn(200, generator=torch.Generator().manual_seed(1))
    x[3] = 0
    seeds = 256
    mean = sum(decode(encode({"x": x}, spec, seed=s), [("x", (200,))])["x"] for s in range(seeds)) / seeds
    amax = _block_absmax(x, 50)
    sd = amax / (2 * LEVELS[spec.name]) if spec.name in LEVELS else amax / 2  # a single draw's bound
    assert bool(((mean - x).abs() <= 5 * sd / math.sqrt(seeds)).all())
    assert encode({"x": x}, spec, seed=7).as_bytes() == encode({"x": x}, spec, seed=7).as_bytes()
    assert encode({"x": x}, spec, seed=7).as_bytes() != encode({"x": x}, spec, seed=8).as_bytes()


# ---------------------------------------------------------------------------------------------------------
# Top-k


def test_topk_keeps_exactly_the_largest_entries_of_each_chunk():
    spec = CodecSpec("topk", density=0.05, chunk=64)
    x = torch.randn(1000)
    got = decode(encode({"x": x}, spec), [("x", (1000,))])["x"]
    for s, e in chunks(1000, 64):
        kept = got[s:e].nonzero().squeeze(1)
        assert len(kept) == keep_count(spec, e - s)
        assert torch.equal(got[s:e][kept], x[s:e][kept])  # fp32 values: exact
        assert x[s:e].abs()[kept].min() > np.delete(x[s:e].abs().numpy(), kept.numpy()).max()


def test_topk_ties_go_to_the_lower_index_and_nan_counts_as_largest():
    spec = CodecSpec("topk", density=0.5, chunk=6)
    x = torch.tensor([1.0, -3.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0, 2.0, 2.0, float("nan"), 2.0])
    got = decode(encode({"x": x}, spec), [("x", (12,))])["x"]
    want = torch.tensor([0.0, -3.0, 3.0, 3.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, float("nan"), 0.0])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert decode(encode({"z": torch.zeros(10)}, spec), [("z", (10,))])["z"].abs().sum() == 0


def test_topk_composes_with_a_quantised_value_codec():
    x = torch.randn(3000)
    for values in ("int8", "2bit"):
        spec = CodecSpec("topk", density=0.03, chunk=500, values=values, block_size=32)
        got = decode(encode({"x": x}, spec), [("x", (3000,))])["x"]
        dense = decode(encode({"x": x}, CodecSpec("topk", density=0.03, chunk=500)), [("x", (3000,))])["x"]
        kept = dense != 0
        vals = decode(encode({"v": dense[kept]}, value_spec(spec)), [("v", (int(kept.sum()),))])["v"]
        assert torch.equal(got[kept], vals) and not bool(got[~kept].any())


# ---------------------------------------------------------------------------------------------------------
# Malformed payloads: a CodecError naming the reason, never another exception


def _payload(spec, tensors=None):
    tensors = tensors if tensors is not None else {"x": torch.randn(100)}
    return encode(tensors, spec), layout_of(tensors)


def _set_layout(key, value):
    return lambda p: p.layout.__setitem__(key, value)


def _write(offset, values):
    def edit(p):
        data = p.data.copy()
        raw = np.asarray(values).tobytes()
        data[offset:offset + len(raw)] = np.frombuffer(raw, np.uint8)
        p.data = data
    return edit


def _indices(changes):
    """Set some of a chunk-64 topk payload's five indices (k = 3 of 64, then 2 of 36) to other values and
    code them again, Elias-Fano as the reference does (4 bytes)."""
    def edit(p):
        data = p.data.copy()
        idx = np.concatenate(ref_elias_fano_decode(data[:4], [64, 36], [3, 2]))
        for at, value in changes.items():
            idx[at] = value
        data[:4] = ref_elias_fano([idx[:3], idx[3:]], [64, 36])
        p.data = data
    return edit


def _flip_bit(bit):
    def edit(p):
        data = p.data.copy()
        data[bit // 8] ^= 1 << bit % 8
        p.data = data
    return edit


INT8, TOPK = CodecSpec("int8", block_size=16), CodecSpec("topk", density=0.05, chunk=64)  # topk: k = 3 then 2


@pytest.mark.parametrize("spec,edit,match", [
    (INT8, _set_layout("codec", "pickle"), "unknown codec"),
    (INT8, lambda p: p.layout.pop("codec"), "unknown codec"),
    (INT8, _set_layout("block_size", 0), "block_size"),
    (INT8, _set_layout("block_size", "16"), "block_size"),
    (INT8, _set_layout("block_size", True), "block_size"),
    (INT8, _set_layout("block_size", 2**40), "block_size"),
    (INT8, _set_layout("stochastic", "no"), "stochastic"),
    (INT8, _set_layout("zstd", 1), "unknown keys"),
    (INT8, _set_layout("name", "fp32"), "unknown keys"),
    (INT8, _set_layout("density", 0.5), "parameters"),
    (INT8, lambda p: p.layout.pop("block_size"), "parameters"),
    (TOPK, _set_layout("density", 0), "density"),
    (TOPK, _set_layout("density", 1.5), "density"),
    (TOPK, _set_layout("density", float("nan")), "density"),
    (TOPK, _set_layout("chunk", 70000), "chunk"),
    (TOPK, _set_layout("values", "topk"), "values"),
    (CodecSpec("2bit"), _set_layout("two_bit", "median"), "two_bit"),
    (INT8, lambda p: setattr(p, "data", p.data[:-1]), "truncated"),
    (INT8, lambda p: setattr(p, "data", np.zeros(10**6, np.uint8)), "oversized"),
    (INT8, lambda p: setattr(p, "data", p.data.view(np.float32)), "uint8"),
    (INT8, lambda p: setattr(p, "layout", ["x"]), "not a JSON object"),
    (INT8, lambda p: p.layout["tensors"][0].__setitem__(1, [99]), "shape"),
    (INT8, _write(4, np.float32(np.nan)), "scale"),
    (INT8, _write(0, np.float32(np.inf)), "scale"),
    (INT8, _write(8, np.float32(-1.0)), "scale"),
    (TOPK, _indices({4: 36}), "indices"),     # the second chunk has 36 elements
    (TOPK, _indices({1: 0}), "indices"),      # first chunk: [i0, 0, i2] is not increasing
    (TOPK, _indices({0: 5, 1: 5}), "indices"),
    (TOPK, _flip_bit(12), "indices"),         # the first chunk's upper bitmap (bits 12..18) loses or gains one
    (TOPK, _flip_bit(30), "indices"),         # the second chunk's (bits 27..31)
])
def test_a_malformed_payload_is_a_codec_error_with_a_reason(spec, edit, match):
    payload, layout = _payload(spec)
    payload = Payload(json.loads(payload.layout_json()), payload.data)
    edit(payload)
    with pytest.raises(CodecError, match=match):
        decode(payload, layout)


def test_a_payload_claiming_an_enormous_tensor_is_refused_without_allocating_it():
    huge = [("w", (1 << 40, 1 << 10))]  # 4 PiB as fp32
    for spec in (CodecSpec(), CodecSpec("int8"), CodecSpec("topk", density=1e-9, values="2bit")):
        layout = {"codec": spec.name, **spec.params(), "tensors": [["w", [1 << 40, 1 << 10]]]}
        with pytest.raises(CodecError, match="truncated"):
            decode(Payload(layout, np.zeros(64, np.uint8)), huge)
        with pytest.raises(CodecError, match="shape"):
            decode(Payload(layout, np.zeros(64, np.uint8)), [("w", (4,))])


def test_a_compressed_reply_with_bad_bytes_is_rejected_by_the_server():
    from photon.federation.protocol import (
        UPDATE,
        ClientReply,
        ClientTask,
        Rejected,
        decode_reply,
        encode_reply,
    )

    task = ClientTask(task_id="t", run_id="r", client_id=0, round=0, global_step=0, cursor=0, local_steps=1,
                      schedule_steps=1, batch_size=1, spans=[], config={})
    update = {"x": torch.randn(100)}
    wire = encode_reply(ClientReply(task_id="t", client_id=0, round=0, samples=1, steps=1, cursor=1, loss=1.0,
                                    train_seconds=1.0, update=update))
    payload = encode(update, CodecSpec("int8", block_size=16))
    wire.payloads[UPDATE] = Payload(payload.layout, payload.data.copy())
    assert decode_reply(wire, task, layout_of(update), None).update["x"].shape == (100,)
    wire.payloads[UPDATE].data[:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    with pytest.raises(Rejected, match="update: tensor 'x': a block scale"):
        decode_reply(wire, task, layout_of(update), None)


def test_a_layout_survives_json_and_raw_bytes():
    tensors = _tensors()
    spec = CodecSpec("topk", density=0.05, values="2bit", two_bit="codebook", stochastic=True)
    payload = encode(tensors, spec, seed=5)
    back = Payload.from_parts(payload.layout_json(), payload.as_bytes())
    assert CodecSpec.from_layout(back.layout) == spec
    for name, t in decode(back, layout_of(tensors)).items():
        assert torch.equal(t, decode(payload, layout_of(tensors))[name])


FUZZ_SPECS = [CodecSpec("int4", block_size=16), CodecSpec("2bit", block_size=16, two_bit="codebook"),
              CodecSpec("topk", density=0.1, chunk=16, values="int8", block_size=8), CodecSpec("bf16")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(range(len(FUZZ_SPECS))), cut=st.integers(-8, 8),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6))
def test_fuzzed_bytes_decode_or_raise_a_codec_error(which, cut, flips):
    payload, layout = _payload(FUZZ_SPECS[which], {"a": torch.randn(50), "b": torch.randn(3, 7)})
    data = payload.data.copy()
    for at, byte in flips:
        data[at % len(data)] = byte
    data = data[:len(data) + cut] if cut < 0 else np.concatenate([data, np.zeros(cut, np.uint8)])
    try:
        got = decode(Payload(payload.layout, data), layout)
    except CodecError as e:
        assert "\n" not in str(e)
    else:
        assert cut == 0 and {k: tuple(v.shape) for k, v in got.items()} == dict(layout)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(["codec", "block_size", "stochastic", "density", "chunk", "values", "two_bit", "tensors",
                            "extra"]), value=JSON)
def test_fuzzed_layouts_decode_or_raise_a_codec_error(key, value):
    payload, layout = _payload(CodecSpec("topk", density=0.1, chunk=16, values="int8", block_size=8))
    try:
        decode(Payload({**payload.layout, key: value}, payload.data), layout)
    except CodecError:
        pass


# ---------------------------------------------------------------------------------------------------------
# The spec


@pytest.mark.parametrize("field,value", [("name", "zstd"), ("values", "topk"), ("density", 0.0), ("density", 2),
                                         ("chunk", 0), ("chunk", 65537), ("block_size", 0), ("block_size", 1.5),
                                         ("stochastic", 1), ("two_bit", "mean")])
def test_a_bad_spec_names_its_field(field, value):
    with pytest.raises(ValueError, match=field):
        CodecSpec(**{field: value}).validate()


def test_encode_refuses_an_unknown_codec():
    with pytest.raises(ValueError, match="name='zstd'"):
        encode({"x": torch.zeros(2)}, "zstd")
