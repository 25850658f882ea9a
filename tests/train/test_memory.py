"""The sizing tables' memory model (`photon/train/memory.py`) against the tensors a real step holds."""

import pytest

from photon.data.shards import TokenStream
from photon.model.transformer import Transformer
from photon.train.local import make_optimizer, train_local
from photon.train.memory import client_memory
from tests.helpers import tiny_cfg

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


def test_a_run_counts_every_client_training_at_once_and_its_server(monkeypatch):
    """On the CPU, simulated workers training side by side and the server share the machine's RAM; on a GPU each
    rank has a device of its own."""
    from photon.config import load_config
    from photon.errors import UserError
    from photon.model.transformer import count_params
    from photon.train import memory

    cfg = load_config("small")
    one = memory.run_memory(cfg, "cpu")["total"]
    two = memory.run_memory(cfg, "cpu", clients_at_once=2, server=True)
    server = memory.SERVER_MODELS * 4 * count_params(cfg.model) + memory.RUNTIME_BYTES
    assert one == client_memory(cfg)["total"] + memory.RUNTIME_BYTES
    assert two["total"] == 2 * one + server
    assert memory.run_memory(cfg, "cuda", clients_at_once=2, server=True)["total"] == client_memory(cfg)["total"]
    alone = memory.run_memory(cfg, "cpu", clients_at_once=1, server=True)["total"]
    monkeypatch.setattr(memory, "device_memory", lambda _: int(alone))  # one client and the server fit
    memory.check_fits(cfg, "cpu", server=True)
    with pytest.raises(UserError, match=r"this run needs about .* 2 training processes at once .* plus .* for the "
                                        r"server.*: train at most 1 client\(s\) at once \(federation.num_nodes=1\)"):
        memory.check_fits(cfg, "cpu", clients_at_once=2, server=True)
    lean_two = memory.run_memory(memory.lean_config(cfg), "cpu", clients_at_once=2, server=True)["total"]
    assert alone < lean_two < two["total"]
    monkeypatch.setattr(memory, "device_memory", lambda _: int((lean_two + two["total"]) / 2))
    with pytest.raises(UserError, match=r"train lean \(the same updates, more compute: --set train.step_in_backward"):
        memory.check_fits(cfg, "cpu", clients_at_once=2, server=True)
    monkeypatch.setattr(memory, "device_memory", lambda _: int(0.5 * one))  # not even one client: fewer cannot help
    with pytest.raises(UserError) as refused:
        memory.check_fits(cfg, "cpu", clients_at_once=2, server=True)
    assert "num_nodes" not in str(refused.value) and "lower train.batch_size" in str(refused.value)
    with pytest.raises(UserError, match=r"this run needs .*model, optimizer, activations and the process's runtime"):
        memory.check_fits(cfg, "cpu")  # a centralized run


def test_photon_run_refuses_a_simulation_whose_workers_together_do_not_fit(monkeypatch, tmp_path):
    import os

    from typer.testing import CliRunner

    from photon.cli import app
    from photon.config import load_config
    from photon.train import memory

    alone = memory.run_memory(load_config("tiny"), "cpu", clients_at_once=1, server=True)["total"]
    monkeypatch.setattr(memory, "device_memory", lambda _: int(alone))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.chdir(tmp_path)
    args = ["run", "-p", "tiny", "--set", "federation.num_nodes=2", "--set", "train.device=cpu"]
    res = CliRunner().invoke(app, args)  # tiny: K = 2 clients a round, on 2 workers
    assert res.exit_code != 0 and "(federation.num_nodes=1)" in str(res.exception)
    assert not (tmp_path / "runs").exists()  # refused before any set-up
    res = CliRunner().invoke(app, [*args, "--set", "federation.clients_per_round=1",
                                   "--set", "data.prep_dir=not_prepared"])  # one client a round: it fits
    assert "not_prepared holds no prepared data" in str(res.exception)  # got past the memory check
