"""The recipe benchmark end to end on a tiny budget: every grid point trains and is stored with its exact
overrides, grids grow past an edge, the headline arms get their seeds, K, IID and Muon arms follow the best
settings, and the report is a pure function of the stored record."""

import json

import pytest
from tests.helpers import tiny_cfg

from photon.bench.recipe import RecipePlan, _grow, _linear, render, run_recipe_bench

PLAN = RecipePlan("tiny", clients=2, steps=16, hs=(4, 8), outer_lrs=(0.6, 1.0), momenta=(0.5, 0.9),
                  lr_grid=(1.0, 2.0), lr_extend=0, ks=(1,), seeds=2, jobs=1, eval_every_steps=8)


@pytest.fixture(scope="module")
def recipe_run(tiny_prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    base = tiny_cfg(tiny_prep, "train.threads=1", "train.warmup_steps=2", "train.eval_batches=2")
    return out, run_recipe_bench(base, out / "run", PLAN, results_dir=out / "results")


def test_every_grid_point_and_stage_is_trained_and_stored(recipe_run):
    out, data = recipe_run
    assert data["stages_done"] == 3
    g, b = data["grid"], data["best"]
    assert set(g["fedavg"]) == {"4", "8"} and set(g["nesterov"]) == {"0.5", "0.9"}
    assert all(set(g["nesterov"][mu][h]) == {"0.6", "1"} for mu in ("0.5", "0.9") for h in ("4", "8"))
    assert set(g["central"]) == {f"{x:g}" for x in (0.003, 0.006)}
    assert set(g["inner"]) == set(g["inner_fedavg"]) == set(g["central"])
    names = {a["name"] for a in data["arms"].values()}
    fed_h = f"h{b['fedavg_h']}"
    nes = f"nesterov{b['nesterov_lr']:g}-m{b['nesterov_momentum']:g}-h{b['nesterov_h']}"
    assert {f"fedavg-{fed_h}-k2-iid", f"{nes}-k2-iid", f"fedavg-{fed_h}-k1", f"{nes}-k1"} <= names
    assert any(n.endswith("-muon") for n in names)
    headline = (f"central@{b['central_lr']:g}", f"fedavg-{fed_h}-k2@{b['fedavg_inner_lr']:g}",
                f"{nes}-k2@{b['inner_lr']:g}")
    for key in headline:
        assert set(data["arms"][key]["runs"]) == {"0", "1"}, key  # the headline arms have every seed
    muon = next(a for a in data["arms"].values() if a["name"].endswith("-muon"))
    assert "train.optimizer=muon" in muon["overrides"]
    assert set(g["muon"]) == set(g["central_muon"]) == set(g["central"])  # Muon's LR swept on both sides
    assert f"central-muon@{b['central_muon_lr']:g}" in data["arms"] and b["muon_lr"] in {0.003, 0.006}
    for arm in data["arms"].values():  # each Nesterov arm runs at the momentum its name gives
        if arm["name"].startswith("nesterov"):
            mu = arm["name"].split("-m")[1].split("-")[0]
            assert [o for o in arm["overrides"] if o.startswith("federation.outer.momentum=")][-1].endswith(f"={mu}")
    stored = json.loads((out / "results" / "recipe.json").read_text())["data"]
    assert render(stored) == render(json.loads(json.dumps(stored))) == render(data)


def test_every_federated_replica_takes_the_centralized_steps_on_its_share_of_the_batch(recipe_run):
    _, data = recipe_run
    central = next(a for a in data["arms"].values() if a["name"] == "central")
    batch = int(next(o for o in central["overrides"] if o.startswith("train.batch_size=")).split("=")[1])
    for arm in data["arms"].values():
        if arm["kind"] != "federated":
            continue
        o = dict(x.split("=", 1) for x in arm["overrides"])
        k, h, r = (int(o[f"federation.{x}"]) for x in ("clients_per_round", "local_steps", "rounds"))
        assert int(o["train.batch_size"]) * k == batch and h * r == PLAN.steps, arm["name"]


def test_a_grid_grows_one_step_past_the_edge_that_holds_the_best():
    assert _grow([0.4, 0.6], {0.4: 1.0, 0.6: 2.0}, 1, _linear) == pytest.approx(0.2)
    assert _grow([0.4, 0.6], {0.4: 2.0, 0.6: 1.0}, 1, _linear) == pytest.approx(0.8)
    assert _grow([0.4, 0.6, 0.8], {0.4: 2.0, 0.6: 1.0, 0.8: 3.0}, 1, _linear) is None
    assert _grow([0.2, 0.4], {0.2: 1.0, 0.4: 2.0}, 1, _linear) == pytest.approx(0.1)  # halves: never to zero
    assert _grow([0.4, 0.6], {0.4: 1.0}, 0, _linear) is None  # no growth left


def test_a_record_from_before_the_momentum_was_swept_still_renders(recipe_run):
    _, data = recipe_run
    old = json.loads(json.dumps(data))
    plan, best = old["plan"], old["best"]
    del plan["momenta"]
    plan["momentum"] = 0.9
    old["grid"]["nesterov"] = old["grid"]["nesterov"]["0.9"]
    del best["nesterov_momentum"]
    old["arms"] = {k.replace("-m0.9-h", "-h"): {**a, "name": a["name"].replace("-m0.9-h", "-h")}
                   for k, a in old["arms"].items() if "-m0.5-" not in k}
    text = render(old)
    assert "| Nesterov η=0.6 μ=0.9 |" in text and "μ=0.5" not in text
