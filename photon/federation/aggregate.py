"""Streaming weighted mean of client models: each reply is folded in as it arrives and then dropped.

The server holds the global model plus one float64 accumulator, whatever K is. Float64 makes the
result independent of arrival order in practice (exactly so for K ≤ 2, since addition commutes): a resumed
run whose replies arrive in another order still reproduces the same parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

Tensors = dict[str, torch.Tensor]


class StreamingMean:
    def __init__(self) -> None:
        self.sum: Tensors = {}
        self.weight = 0.0
        self.count = 0

    def add(self, params: Tensors, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        for name, t in params.items():
            acc = self.sum.get(name)
            if acc is None:
                self.sum[name] = t.to(torch.float64) * weight
            else:
                acc.add_(t.to(torch.float64), alpha=weight)
        self.weight += weight
        self.count += 1

    def mean(self, like: Tensors) -> Tensors:
        """The weighted mean, cast to each reference tensor's dtype."""
        assert self.count > 0, "mean of no replies"
        return {name: (self.sum[name] / self.weight).to(ref.dtype) for name, ref in like.items()}

    def pseudo_gradient(self, params: Tensors) -> PseudoGradient:
        """Δ = θ − mean(θ_k) in float64, computed one tensor at a time as the outer optimizer asks."""
        assert self.count > 0, "pseudo-gradient of no replies"
        return PseudoGradient(params, self)


class PseudoGradient(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> Δ tensor (float64) that never materialises the whole Δ at once."""

    def __init__(self, params: Tensors, mean: StreamingMean):
        self._params, self._mean = params, mean
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            acc = self._mean.sum[name]
            self._last = (name, self._params[name].to(torch.float64) - acc / self._mean.weight)
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)
