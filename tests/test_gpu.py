"""Checks that only a CUDA machine can run (skipped elsewhere): `make gpu-check` runs exactly these, then the
trainer benchmark on the GPU. The same code paths run on CPU in the rest of the suite."""

import gc

import pytest
import torch

from tests.helpers import tiny_cfg

pytestmark = pytest.mark.gpu


def _setup(prep, *overrides):
    from photon.data.shards import TokenStream, open_prepared
    from photon.model.transformer import Transformer
    from photon.train.device import place, resolve_device, setup_backend
    from photon.train.local import make_optimizer

    cfg = tiny_cfg(prep, "train.device=cuda", *overrides)
    prepared = open_prepared(prep)
    device = resolve_device(cfg.train.device)
    setup_backend(device)
    torch.manual_seed(0)
    raw = Transformer(cfg.model)
    model = place(raw, cfg.train, device)
    stream = TokenStream([prepared.tokens(d, "train") for d in prepared.domains], cfg.train.seq_len,
                         cfg.train.batch_size, 0)
    return cfg, raw, model, make_optimizer(raw, cfg.train), stream


def test_auto_picks_cuda_and_tf32_is_on_for_ampere_and_later():
    from photon.train.device import resolve_device, setup_backend

    device = resolve_device("auto")
    assert device.type == "cuda"
    setup_backend(device)
    if torch.cuda.get_device_capability(device)[0] >= 8:
        assert torch.backends.cuda.matmul.allow_tf32


def test_training_on_cuda_uses_fused_adamw_bf16_and_returns_cpu_parameters(tiny_prep):
    from photon.model.transformer import unique_state_dict
    from photon.train.local import optimizer_state_tensors, train_local

    cfg, raw, model, opt, stream = _setup(tiny_prep, "train.bf16=true")
    assert next(raw.parameters()).is_cuda and opt.defaults.get("fused")
    result = train_local(model, opt, stream, 0, 0, 5, cfg.train, 100)
    assert result.losses[-1] < result.losses[0]
    state = optimizer_state_tensors(raw, opt)
    assert state and all(t.device.type == "cpu" for t in state.values())
    assert all(t.is_cuda for t in unique_state_dict(raw).values())


def test_cuda_and_cpu_training_agree_within_tf32_tolerance(tiny_prep):
    from photon.model.transformer import unique_state_dict
    from photon.train.local import train_local

    cfg, raw, model, opt, stream = _setup(tiny_prep)
    train_local(model, opt, stream, 0, 0, 3, cfg.train, 100)
    on_gpu = {k: v.cpu() for k, v in unique_state_dict(raw).items()}
    cpu_cfg, cpu_raw, cpu_model, cpu_opt, cpu_stream = _setup(tiny_prep, "train.device=cpu")
    train_local(cpu_model, cpu_opt, cpu_stream, 0, 0, 3, cpu_cfg.train, 100)
    for k, v in unique_state_dict(cpu_raw).items():
        torch.testing.assert_close(on_gpu[k], v, rtol=2e-2, atol=2e-3)


def test_a_federated_worker_trains_on_the_gpu_and_replies_with_cpu_tensors(tiny_prep, tmp_path):
    from photon.federation.runner import run_federation
    from photon.federation.worker import ClientWorker
    from photon.transport.inprocess import InProcessTransport
    from tests.helpers import fed_cfg

    cfg = fed_cfg(tiny_prep, "train.device=cuda", "federation.rounds=2", "train.bf16=true")
    summary = run_federation(cfg, tmp_path, InProcessTransport(ClientWorker(tmp_path / "n")))
    assert summary["rounds"] == 2 and summary["losses"]["overall"] < 7.0


def test_chunked_loss_on_the_gpu_matches_the_full_loss():
    from photon.model.transformer import chunked_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4, 512, 64, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(50304, 64, device="cuda", generator=g)
    t = torch.randint(0, 50304, (4, 512), device="cuda", generator=g)
    full = torch.nn.functional.cross_entropy((h @ w.T).float().view(-1, 50304), t.view(-1))
    torch.testing.assert_close(chunked_cross_entropy(h, w, t, 1000), full, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_a_two_gpu_client_matches_one_gpu(tiny_prep, tmp_path):
    pytest.importorskip("photon.train.distributed")
    from photon.federation.worker import ClientWorker
    from tests.train.test_distributed import one_task_update  # noqa: F401  (provided by the multi-process client's tests)

    update_1 = one_task_update(tiny_prep, tmp_path / "one", procs=1, device="cuda")
    update_2 = one_task_update(tiny_prep, tmp_path / "two", procs=2, device="cuda")
    for k, v in update_1.items():
        torch.testing.assert_close(update_2[k], v, rtol=1e-3, atol=1e-4)
    assert ClientWorker


def _peak_of_one_step(prep, *overrides):
    """Peak CUDA memory of a step after the first (AdamW state already there), and the parameters after it."""
    from photon.model.transformer import unique_state_dict
    from photon.train.local import train_local

    cfg, raw, model, opt, stream = _setup(prep, "model.d_model=256", "model.n_layer=4", "train.batch_size=1",
                                          "train.bf16=true", "train.grad_clip=1.0", *overrides)
    train_local(model, opt, stream, 0, 0, 1, cfg.train, 100)
    gc.collect()  # an earlier call's model can sit in a reference cycle (torch's lazy imports) until collected
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_local(model, opt, stream, 1, 1, 1, cfg.train, 100)
    torch.cuda.synchronize()
    grads = sum(p.numel() * 4 for p in raw.parameters())
    return torch.cuda.max_memory_allocated(), grads, {k: v.cpu() for k, v in unique_state_dict(raw).items()}


def test_step_in_backward_on_cuda_saves_the_gradients_and_trains_the_same(tiny_prep):
    """train.step_in_backward with activation checkpointing: the usual step's parameters (fused CUDA AdamW, one
    parameter at a time, after the clipping norm pass; close, not bitwise: CUDA's multi-tensor norm and the
    per-gradient norms sum in different orders), at a peak at least half the gradients' size lower
    (all but the largest parameter's gradient never exist; batch 1, so parameters dominate the memory)."""
    usual, grads, p0 = _peak_of_one_step(tiny_prep, "train.activation_checkpointing=true")
    lean, _, p1 = _peak_of_one_step(tiny_prep, "train.activation_checkpointing=true", "train.step_in_backward=true")
    for k, v in p0.items():
        torch.testing.assert_close(p1[k], v, rtol=1e-5, atol=1e-6)
    assert lean <= usual - grads // 2, (lean, usual, grads)
