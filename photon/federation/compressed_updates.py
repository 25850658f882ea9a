"""Compressed updates both ways, with error feedback; engine-free, on top of `codec.py`.

Up: a client sends C(Δ_k + β·e_k), where Δ_k = θ − θ_k is its update, e_k what earlier compression left out
and β the residual's decay (SparseLoCo's 0.95: an old residual fades instead of being re-added forever, which
with kept client AdamW re-applies progress the client already re-derived). It keeps
e_k' = (Δ_k + β·e_k) − D(C(Δ_k + β·e_k)) as part of its kept state (`client_state.py`: it follows the client,
is committed with the round and restored on resume; lost with its node when `state_backup` is off, then the
client restarts with e = 0). In the first `error_feedback_warmup_rounds` rounds it sends C(Δ_k) and keeps
e = 0, so the LR warm-up's large, fast-changing updates are not carried. The server decodes C(·) like any
other update.

Down: after the outer step the server sends the outer update U = θ_new − θ_old (+ β × its own residual e_s),
compressed, the same bytes to every node, and *defines* the new global model as θ_old + D(C(U + e_s)): exactly
what a node that holds θ_old reconstructs, so server and nodes never drift (the task names the new model's
digest and the node checks it). A node without θ_old (new, restarted, lagging) gets the full model.

Down as the round's replies (`down.codec: replies`, SparseLoCo's way): nothing is re-compressed and the server
keeps no residual. The server sends the round's accepted up-link messages, in the canonical order, with the
outer LR; every node (and the server itself) rebuilds θ_new = θ_old − lr · contributor-mean(D(messages)) with
one function (`rebuild_from_replies`), so the bytes define the model exactly. It costs the sum of the K sparse
messages instead of a model-sized update.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from photon.config import CodecConfig
from photon.federation import codec
from photon.federation.codec import CodecError, Payload
from photon.federation.fold import contributor_mean_of, in_memory_chunks

Tensors = dict[str, torch.Tensor]
EF = "ef/"  # prefix of error-feedback residuals inside a client's kept state
REPLIES = "replies"  # the down-link codec that sends the round's replies instead of a compressed update


def is_identity(cfg: CodecConfig) -> bool:
    """fp32 without error feedback: the full model, exactly."""
    return cfg.codec == "fp32" and not cfg.error_feedback


def residual_layout(layout: codec.Layout) -> codec.Layout:
    return [(EF + name, shape) for name, shape in layout]


def client_message(update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
                   cfg: CodecConfig, seed: int, round_: int = 0) -> tuple[Payload, Tensors | None]:
    """C(Δ + β·e) and, with error feedback, the new residual (named `ef/<param>`, fp32, CPU); in a warm-up
    round (`round_` < error_feedback_warmup_rounds) C(Δ) and a zero residual."""
    spec = codec.CodecSpec.of(cfg)
    if not cfg.error_feedback:
        return codec.encode(update, spec, seed=seed), None
    if round_ < cfg.error_feedback_warmup_rounds:
        return codec.encode(update, spec, seed=seed), {EF + k: torch.zeros(v.shape) for k, v in sorted(update.items())}
    beta = cfg.error_feedback_decay
    target = {k: (v + beta * residual[EF + k]) if residual is not None else v.clone() for k, v in update.items()}
    payload = codec.encode(target, spec, seed=seed)
    decoded = codec.decode(payload, codec.layout_of(target))
    new_residual = {EF + k: target[k].sub_(decoded[k]) for k in sorted(target)}  # in place: no extra copy
    return payload, new_residual


def server_broadcast(params: Tensors, old: Mapping[str, torch.Tensor], residual: Tensors | None, cfg: CodecConfig,
                     seed: int) -> tuple[Payload, Tensors | None]:
    """Compress the outer update U = params − old (+ residual) and set `params` to old + D(C(U)) in place;
    returns the payload every node holding `old` applies, and the new residual (error feedback on)."""
    beta = cfg.error_feedback_decay
    target = {k: params[k] - old[k] + (beta * residual[k] if residual is not None else 0) for k in sorted(params)}
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
    """A node's new global model from the one it holds and the server's compressed update (or the round's
    replies)."""
    if payload.layout.get("codec") == REPLIES:
        return rebuild_from_replies(base, payload, layout)
    decoded = codec.decode(payload, layout)
    return {k: apply_update(base[k], decoded[k]) for k, _ in layout}


def replies_payload(parts: list[Payload], lr: float) -> Payload:
    """The round's accepted up-link messages (canonical order) and the outer LR, as one down-link payload."""
    assert parts, "a round folds at least one reply"
    layout = {"codec": REPLIES, "lr": float(lr), "parts": [p.layout for p in parts],
              "tensors": parts[0].layout["tensors"]}
    return Payload.over(layout, b"".join(p.as_bytes() for p in parts))


def rebuild_from_replies(base: Mapping[str, torch.Tensor], payload: Payload, layout: codec.Layout) -> Tensors:
    """θ_old − lr · contributor-mean of the decoded replies: the new model, the same bytes on every side."""
    parts, lr = payload.layout.get("parts"), payload.layout.get("lr")
    if not isinstance(parts, list) or not parts or not isinstance(lr, float) or not lr > 0:
        raise CodecError("a replies payload needs a non-empty 'parts' list and a positive 'lr'")
    decoded, at = [], 0
    for part in parts:
        if not isinstance(part, dict):
            raise CodecError("a replies payload part is not a layout")
        n = codec.payload_nbytes(codec.CodecSpec.from_layout(part), layout)
        if at + n > payload.nbytes:
            raise CodecError(f"replies payload has {payload.nbytes} bytes, its parts need more")
        decoded.append(codec.decode(Payload(part, payload.data[at:at + n]), layout))
        at += n
    if at != payload.nbytes:
        raise CodecError(f"replies payload has {payload.nbytes} bytes, its parts need {at}")
    delta = contributor_mean_of(layout, lambda: in_memory_chunks(layout, decoded))
    return {k: base[k].to(torch.float32).sub(delta[k], alpha=lr) for k, _ in layout}
