"""Where training runs: the device, its numerics (bf16 autocast, TF32), and how the model is wrapped for it
(activation checkpointing, `torch.compile`). The inner loop (`local.py`) stays one loop for every device;
this module only decides how the model and the batches are placed and wrapped. Parameters always leave a
client as CPU tensors (the wire and the server are device-agnostic).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging

import torch
from torch import nn

from photon.config import TrainConfig
from photon.errors import UserError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda when available, else cpu; an explicit device that is not there is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available here; use train.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but Apple's MPS backend is not available here; use auto or cpu")
    return torch.device(name)


def setup_backend(device: torch.device) -> None:
    """TF32 matmuls on Ampere and later (fp32 weights, 10-bit mantissa inputs: what PyTorch recommends for
    training); nothing to do on CPU."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device | str, bf16: bool, keep_casts: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device type in use (weights and optimizer state stay fp32). `keep_casts=False`
    turns off autocast's cache of each weight's bf16 copy: the cache holds every copy until the forward
    ends (half a model), which undoes activation checkpointing's saving, since backward would otherwise
    recast each block's weights as it recomputes the block. Each weight is cast once per forward either way."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=keep_casts)


def place(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model on `device`, with activation checkpointing and `torch.compile` as configured, and the device's
    numerics set up (`setup_backend`: every model placed on a GPU trains with the same matmul precision, here
    or in a rank). Returns the module to call (compiled or not); state dicts are read through
    `transformer.unique_state_dict`, which looks through the compile wrapper."""
    setup_backend(device)
    model.to(device)
    if hasattr(model, "checkpoint_blocks"):
        model.checkpoint_blocks = cfg.activation_checkpointing
    if hasattr(model, "loss_chunk") and cfg.loss_chunk is not None:
        model.loss_chunk = cfg.loss_chunk
    if cfg.compile:
        return torch.compile(model)
    return model


def batch_to(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if device.type == "cpu":
        return tensors
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def release_freed_memory() -> None:
    """Hand memory the process freed back to the OS (glibc `malloc_trim`): model-sized tensors of a few MB each
    fall under glibc's dynamic mmap threshold, so after a phase frees them (a round's gradients, a decoded
    reply) the heap would otherwise keep them resident and the next phase's peak would stack on top. A no-op
    where glibc is absent."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim
