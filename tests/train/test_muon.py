"""Muon as the inner optimizer: the pair steps exactly as torch's own Muon and AdamW side by side, its state
travels as named tensors, and a federated run with kept Muon state resumes bitwise."""

import pytest
import torch

from photon.config import load_config
from photon.train.local import load_optimizer_state_tensors, make_optimizer, optimizer_state_tensors
from photon.train.muon import MuonAdamW, is_muon_param


def _model(seed=0):
    from photon.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(load_config("tiny").model)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_only_the_blocks_hidden_matrices_go_to_muon():
    model = _model()
    names = {n for n, p in model.named_parameters() if is_muon_param(n, p.shape)}
    assert names and all(".layers." in n and n.endswith("proj.weight") for n in names)
    assert "model.embed_tokens.weight" not in names and not any("norm" in n for n in names)


def test_the_pair_steps_exactly_as_torch_muon_and_adamw_side_by_side():
    cfg = load_config("tiny", ["train.optimizer=muon", "train.weight_decay=0.1"]).train
    ours, ref = _model(), _model()
    opt = make_optimizer(ours, cfg)
    assert isinstance(opt, MuonAdamW)
    named = dict(ref.named_parameters())
    muon = [p for n, p in named.items() if is_muon_param(n, p.shape)]
    rest = [p for n, p in named.items() if not is_muon_param(n, p.shape)]
    ref_muon = torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                nesterov=True, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    for step in range(3):
        lr = cfg.lr * (0.5 + step)  # the schedule sets every group's LR
        for group in [*opt.param_groups, *ref_muon.param_groups, *ref_adamw.param_groups]:
            group["lr"] = lr
        _grads(ours, step)
        _grads(ref, step)
        opt.step()
        ref_muon.step()
        ref_adamw.step()
        opt.zero_grad()
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n


def test_muon_state_round_trips_as_named_tensors():
    cfg = load_config("tiny", ["train.optimizer=muon"]).train
    model = _model()
    opt = make_optimizer(model, cfg)
    _grads(model, 0)
    opt.step()
    tensors = optimizer_state_tensors(model, opt)
    assert "model.layers.0.mlp.up_proj.weight.momentum_buffer" in tensors
    assert "model.embed_tokens.weight.exp_avg" in tensors
    fresh = make_optimizer(model, cfg)
    load_optimizer_state_tensors(model, fresh, tensors)
    restored = optimizer_state_tensors(model, fresh)
    assert restored.keys() == tensors.keys() and all(torch.equal(restored[k], v) for k, v in tensors.items())


def test_muon_refuses_what_it_cannot_do():
    from photon.errors import UserError

    with pytest.raises(UserError, match="train.optimizer=muon"):
        load_config("tiny", ["train.optimizer=muon", "federation.procs_per_node=2"])


def test_a_federation_with_kept_muon_state_resumes_bitwise(tiny_prep, tmp_path):
    from tests.helpers import ServerCrash, crash_when, fed_cfg, run

    cfg = fed_cfg(tiny_prep, "train.optimizer=muon", "federation.client_optimizer=persist", "federation.rounds=4")
    reference = run(cfg, tmp_path / "ref")
    with pytest.raises(ServerCrash):
        run(cfg, tmp_path / "b", fail=crash_when(lambda task: task.round == 2))
    assert run(cfg, tmp_path / "b", resume=True)["params_sha"] == reference["params_sha"]
