"""Compressed updates both ways, with error feedback; engine-free, on top of `codec.py`.

Up: a client sends C(Δ_k + e_k), where Δ_k = θ − θ_k is its update and e_k what earlier compression left out;
it keeps e_k' = (Δ_k + e_k) − D(C(Δ_k + e_k)) as part of its kept state (`client_state.py`: it follows the
client, is committed with the round and restored on resume; lost with its node when `state_backup` is off,
then the client restarts with e = 0). The server decodes C(·) like any other update.

Down: after the outer step the server sends the outer update U = θ_new − θ_old (+ its own residual e_s),
compressed, the same bytes to every node, and *defines* the new global model as θ_old + D(C(U + e_s)): exactly
what a node that holds θ_old reconstructs, so server and nodes never drift (the task names the new model's
digest and the node checks it). A node without θ_old (new, restarted, lagging) gets the full model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from photon.config import CodecConfig
from photon.federation import codec
from photon.federation.codec import Payload

Tensors = dict[str, torch.Tensor]
EF = "ef/"  # prefix of error-feedback residuals inside a client's kept state


def is_identity(cfg: CodecConfig) -> bool:
    """fp32 without error feedback: today's exact path."""
    return cfg.codec == "fp32" and not cfg.error_feedback


def residual_layout(layout: codec.Layout) -> codec.Layout:
    return [(EF + name, shape) for name, shape in layout]


def client_message(update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
                   cfg: CodecConfig, seed: int) -> tuple[Payload, Tensors | None]:
    """C(Δ + e) and, with error feedback, the new residual (named `ef/<param>`, fp32, CPU)."""
    spec = codec.CodecSpec.of(cfg)
    if not cfg.error_feedback:
        return codec.encode(update, spec, seed=seed), None
    target = {k: (v + residual[EF + k]) if residual is not None else v.clone() for k, v in update.items()}
    payload = codec.encode(target, spec, seed=seed)
    decoded = codec.decode(payload, codec.layout_of(target))
    new_residual = {EF + k: target[k].sub_(decoded[k]) for k in sorted(target)}  # in place: no extra copy
    return payload, new_residual


def server_broadcast(params: Tensors, old: Mapping[str, torch.Tensor], residual: Tensors | None, cfg: CodecConfig,
                     seed: int) -> tuple[Payload, Tensors | None]:
    """Compress the outer update U = params − old (+ residual) and set `params` to old + D(C(U)) in place;
    returns the payload every node holding `old` applies, and the new residual (error feedback on)."""
    target = {k: params[k] - old[k] + (residual[k] if residual is not None else 0) for k in sorted(params)}
    payload = codec.encode(target, codec.CodecSpec.of(cfg), seed=seed)
    decoded = codec.decode(payload, codec.layout_of(target))
    for k in params:
        params[k].copy_(apply_update(old[k], decoded[k]))
    new_residual = {k: target[k].sub_(decoded[k]) for k in target} if cfg.error_feedback else None
    return payload, new_residual


def apply_update(old: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """The one way both sides rebuild a tensor of the new model: old + D(C(U)) in fp32."""
    return old.to(torch.float32) + decoded


def reconstruct(base: Mapping[str, torch.Tensor], payload: Payload, layout: codec.Layout) -> Tensors:
    """A node's new global model from the one it holds and the server's compressed update."""
    decoded = codec.decode(payload, layout)
    return {k: apply_update(base[k], decoded[k]) for k, _ in layout}
