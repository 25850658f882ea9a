"""Outer optimizers against references: the plain mean, torch.optim.SGD, and the FedAdam/FedYogi formulas."""

import pytest
import torch

from photon.config import OuterConfig
from photon.federation.outer import OUTER_OPTIMIZERS, make_outer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def _deltas(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(4, 3, generator=g) * 0.1, "b": torch.randn(5, generator=g) * 0.1} for _ in range(n)]


def test_fedavg_lr1_is_exactly_the_weighted_mean():
    theta = _params()
    clients = [_params(s) for s in (1, 2, 3)]
    weights = [3.0, 1.0, 2.0]
    reference = {k: (sum(c[k].double() * w for c, w in zip(clients, weights)) / sum(weights)).float() for k in theta}
    # Δ = Σ w_k (θ − θ_k) / Σ w_k, as fold.combine computes it from the clients' updates
    delta = {k: (sum((theta[k] - c[k]).double() * w for c, w in zip(clients, weights)) / sum(weights)).float()
             for k in theta}
    make_outer(OuterConfig(name="fedavg", lr=1.0)).step(theta, delta)
    for k in theta:  # θ − Δ lands within an ulp or two of the mean
        torch.testing.assert_close(theta[k], reference[k], rtol=1e-6, atol=1e-6)


def test_fedavg_server_lr_scales_the_step():
    theta, delta = _params(), _deltas(1)[0]
    ref = {k: theta[k] - 0.5 * delta[k] for k in theta}
    make_outer(OuterConfig(name="fedavg", lr=0.5)).step(theta, delta)
    for k in theta:
        torch.testing.assert_close(theta[k], ref[k])


@pytest.mark.parametrize("name,nesterov", [("nesterov", True), ("fedmom", False)])
def test_momentum_optimizers_match_torch_sgd(name, nesterov):
    theta, deltas = _params(), _deltas(4)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in theta.items()}
    sgd = torch.optim.SGD(ref.values(), lr=0.7, momentum=0.9, nesterov=nesterov)
    outer = make_outer(OuterConfig(name=name, lr=0.7, momentum=0.9))
    for d in deltas:
        for k, p in ref.items():
            p.grad = d[k].clone()
        sgd.step()
        outer.step(theta, d)
    for k in theta:
        torch.testing.assert_close(theta[k], ref[k].detach())


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_follow_reddi_et_al(name):
    cfg = OuterConfig(name=name, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    theta, deltas = _params(), _deltas(3)
    ref = {k: v.clone() for k, v in theta.items()}
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v = {k: torch.zeros_like(t) for k, t in theta.items()}
    outer = make_outer(cfg)
    for d in deltas:
        for k in ref:
            m[k] = 0.9 * m[k] + 0.1 * d[k]
            d2 = d[k] ** 2
            v[k] = 0.99 * v[k] + 0.01 * d2 if name == "fedadam" else v[k] - 0.01 * d2 * torch.sign(v[k] - d2)
            ref[k] = ref[k] - 0.1 * m[k] / (v[k].sqrt() + 1e-3)
        outer.step(theta, d)
    for k in theta:
        torch.testing.assert_close(theta[k], ref[k])


@pytest.mark.parametrize("name", sorted(OUTER_OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    cfg = OuterConfig(name=name, lr=0.3)
    deltas = _deltas(4)
    a, theta_a = make_outer(cfg), _params()
    for d in deltas:
        a.step(theta_a, d)
    b, theta_b = make_outer(cfg), _params()
    for d in deltas[:2]:
        b.step(theta_b, d)
    c = make_outer(cfg)
    c.load_state_dict({k: t.clone() for k, t in b.state_dict().items()})
    for d in deltas[2:]:
        c.step(theta_b, d)
    for k in theta_a:
        assert torch.equal(theta_a[k], theta_b[k])


def test_loading_another_optimizers_state_is_refused():
    nesterov = make_outer(OuterConfig(name="nesterov"))
    nesterov.step(_params(), _deltas(1)[0])
    with pytest.raises(ValueError, match="unknown buffer"):
        make_outer(OuterConfig(name="fedadam")).load_state_dict(nesterov.state_dict())


def test_delayed_nesterov_with_a_delay_of_one_is_nesterov_bitwise():
    deltas = _deltas(5)
    theta_a, theta_b = _params(), _params()
    nesterov = make_outer(OuterConfig(name="nesterov", lr=0.7, momentum=0.9))
    delayed = make_outer(OuterConfig(name="delayed-nesterov", lr=0.7, momentum=0.9, delay=1))
    for d in deltas:
        nesterov.step(theta_a, d)
        delayed.step(theta_b, d)
    assert all(torch.equal(theta_a[k], theta_b[k]) for k in theta_a)


def test_delayed_nesterov_is_nesterov_on_the_mean_of_each_n_steps():
    # By hand (fp64): every step moves θ by −η·Δ/N; every N-th step m ← μ·m + mean(last N Δ) and θ −= η·μ·m.
    lr, mu, n = 0.7, 0.9, 3
    deltas = _deltas(7)
    theta = _params()
    ref = {k: v.double() for k, v in theta.items()}
    m = {k: torch.zeros_like(v) for k, v in ref.items()}
    window: list = []
    outer = make_outer(OuterConfig(name="delayed-nesterov", lr=lr, momentum=mu, delay=n))
    for step, d in enumerate(deltas, 1):
        window.append(d)
        for k in ref:
            ref[k] = ref[k] - lr * d[k].double() / n
            if step % n == 0:
                m[k] = mu * m[k] + sum(w[k].double() for w in window) / n
                ref[k] = ref[k] - lr * mu * m[k]
        if step % n == 0:
            window = []
        outer.step(theta, d)
    for k in theta:
        torch.testing.assert_close(theta[k].double(), ref[k], rtol=1e-6, atol=1e-6)
    assert outer.steps == 7 and int(outer.state_dict()["steps/count"]) == 7


def test_the_cosine_outer_lr_runs_from_lr_to_its_floor_and_holds_there():
    from photon.federation.outer import lr_at

    cfg = OuterConfig(name="nesterov", lr=0.8, schedule="cosine", min_lr_ratio=0.25)
    assert [lr_at(cfg, r, 5) for r in (0, 4, 9)] == pytest.approx([0.8, 0.2, 0.2])
    assert lr_at(cfg, 2, 5) == pytest.approx(0.8 * (0.25 + 0.75 * 0.5))  # halfway: the mean of the two ends
    assert lr_at(OuterConfig(lr=0.8), 3, 5) == 0.8  # constant by default


@pytest.mark.parametrize("name", sorted(OUTER_OPTIMIZERS))
def test_a_step_at_a_given_lr_is_a_step_of_an_optimizer_configured_with_it(name):
    deltas = _deltas(3)
    theta_a, theta_b = _params(), _params()
    scheduled, fixed = make_outer(OuterConfig(name=name, lr=0.9)), make_outer(OuterConfig(name=name, lr=0.3))
    for d in deltas:
        scheduled.step(theta_a, d, lr=0.3)
        fixed.step(theta_b, d)
    assert all(torch.equal(theta_a[k], theta_b[k]) for k in theta_a)


def test_a_run_steps_at_the_scheduled_outer_lr(tiny_prep, tmp_path):
    # FedAvg with a cosine to 0 over 2 rounds: the first outer step at lr 1, the last at 0 (the model stays put).
    from photon.checkpoint import load_checkpoint
    from tests.helpers import fed_cfg, run

    cfg = fed_cfg(tiny_prep, "federation.rounds=2", "federation.outer.schedule=cosine",
                  "federation.outer.min_lr_ratio=0", "train.threads=1")
    run(cfg, tmp_path)
    params = [load_checkpoint(tmp_path / "checkpoints" / f"round_{r:06d}")[0]["model"] for r in (1, 2)]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    constant = fed_cfg(tiny_prep, "federation.rounds=2", "train.threads=1")
    run(constant, tmp_path / "constant")
    moved = load_checkpoint(tmp_path / "constant" / "checkpoints" / "round_000002")[0]["model"]
    assert not all(torch.equal(params[0][k], moved[k]) for k in moved)
