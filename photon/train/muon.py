"""Muon as the inner optimizer (`train.optimizer: muon`), as MuLoCo runs it: torch's own `torch.optim.Muon` on
the transformer blocks' hidden matrices, AdamW on everything else (embeddings, norms), stepped together.

`MuonAdamW` looks like one torch optimizer to the trainer: its `param_groups` are both optimizers' groups (so
the LR schedule sets every group), `state[p]` reaches whichever optimizer owns `p` (so kept client state is
exported and restored as named tensors: `<param>.momentum_buffer` for Muon, AdamW's moments for the rest), and
`step` / `zero_grad` run both. Muon's LR is adjusted per matrix shape to match AdamW's update RMS (Moonshot's
`match_rms_adamw`), so both share `train.lr`, its schedule and `train.weight_decay`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

MUON_STATE = ("momentum_buffer",)


def is_muon_param(name: str, shape: Sequence[int]) -> bool:
    """A hidden matrix of a transformer block: Muon orthogonalises its update; anything else uses AdamW."""
    return len(shape) == 2 and ".layers." in f".{name}"


class _RoutedState:
    """`optimizer.state` of the pair: reads and writes go to the optimizer that owns the parameter."""

    def __init__(self, owner: dict[torch.Tensor, torch.optim.Optimizer]):
        self._owner = owner

    def __getitem__(self, p: torch.Tensor) -> Any:
        return self._owner[p].state[p]

    def __setitem__(self, p: torch.Tensor, value: Any) -> None:
        self._owner[p].state[p] = value

    def __contains__(self, p: object) -> bool:
        return p in self._owner and p in self._owner[p].state

    def get(self, p: torch.Tensor, default: Any = None) -> Any:
        return self._owner[p].state.get(p, default) if p in self._owner else default

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for opt in dict.fromkeys(self._owner.values()) for p in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in dict.fromkeys(self._owner.values()))


class MuonAdamW:
    """torch.optim.Muon on `muon` parameters and torch.optim.AdamW on the `adamw` groups, as one optimizer."""

    def __init__(self, muon: list[nn.Parameter], adamw_groups: list[dict[str, Any]], *, lr: float,
                 weight_decay: float, momentum: float, betas: tuple[float, float], eps: float,
                 adamw_kernel: dict[str, bool]):
        self.muon = torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, **adamw_kernel)
        owner = {p: self.muon for p in muon}
        owner.update({p: self.adamw for g in adamw_groups for p in g["params"]})
        self.state = _RoutedState(owner)
        self.defaults = self.adamw.defaults  # `fused` decides where AdamW's step counter lives

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)
