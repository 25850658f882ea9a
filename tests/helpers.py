"""Helpers shared by the tests: configs, in-process runs, crash hooks and comparisons."""

import torch


def assert_close_by_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """`actual` equals `expected` up to a difference whose L2 norm is at most `rel` times `expected`'s norm.

    Element-wise tolerances judge a near-zero element by its own size, so they pass on one CPU's kernels and
    fail on another's, where a different summation order moved that element by a rounding step. The norm of the
    difference against the tensor's norm is what fp32 rounding bounds on any machine."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    assert diff <= rel * scale or diff == 0.0, f"{what}: |difference| {diff:.3g} > {rel:g} x |expected| {scale:.3g}"


def encoded_size(layout, spec) -> int:
    """Bytes a payload of `layout` (name, shape pairs) takes under the codec `spec`: every codec's size depends
    only on the shapes, so encoding zeros tells."""
    from photon.federation import codec

    return codec.encode({name: torch.zeros(shape) for name, shape in layout}, spec).nbytes
