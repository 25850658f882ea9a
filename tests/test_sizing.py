"""The sizing tables' memory model (`photon/bench/sizing.py`) against the tensors a real step holds."""

import pytest
import torch
from conftest import tiny_cfg

from photon.bench.sizing import client_memory
from photon.data.shards import TokenStream
from photon.model.transformer import Transformer
from photon.train.local import make_optimizer, train_local

pytestmark = pytest.mark.usefixtures("one_thread")


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("in_backward", [False, True])
def test_model_states_are_the_bytes_a_step_holds(tiny_prepared, in_backward):
    """Weights + AdamW moments + the most gradient bytes alive at once (all of them, or with
    train.step_in_backward the largest parameter's) equal the estimate's model states."""
    cfg = tiny_cfg(tiny_prepared.path, f"train.step_in_backward={str(in_backward).lower()}")
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg.train)
    stream = TokenStream([tiny_prepared.tokens(d, "train") for d in tiny_prepared.domains], cfg.train.seq_len,
                         cfg.train.batch_size, 0)
    params = list(model.parameters())
    grads = []
    for p in params:  # registered first: runs before the step hook frees the gradient
        p.register_post_accumulate_grad_hook(lambda _: grads.append(_nbytes(q.grad for q in params
                                                                             if q.grad is not None)))
    train_local(model, opt, stream, 0, 0, 1, cfg.train, 10)
    moments = [v for state in opt.state.values() for k, v in state.items() if k != "step"]
    held = _nbytes(params) + _nbytes(moments) + max(grads)
    assert client_memory(cfg)["model_states"] == held
