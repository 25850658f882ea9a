"""torchft's DiLoCo as a peer: refuses recipes it cannot match; on a tiny run, lands where our DiLoCo lands."""

import pytest

from photon.errors import UserError
from tests.helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

DILOCO = ("data.partition.num_clients=2", "federation.clients_per_round=2", "federation.num_nodes=2",
          "federation.local_steps=2", "federation.rounds=2", "federation.outer.name=nesterov",
          "federation.outer.lr=0.7", "federation.outer.momentum=0.9", "federation.client_optimizer=persist",
          "train.warmup_steps=1", "train.threads=1")


@pytest.mark.parametrize("override, key", [
    ("federation.outer.name=fedadam", "federation.outer.name"),
    ("federation.clients_per_round=1", "federation.clients_per_round"),
    ("federation.compression.up.codec=int8", "federation.compression"),
    ("federation.aggregation=median", "federation.aggregation"),
])
def test_refuses_a_recipe_it_cannot_match(tmp_path, override, key):
    from photon.bench.baselines.torchft import run_torchft_diloco

    cfg = tiny_cfg(tmp_path / "no-data", *DILOCO, override)
    with pytest.raises(UserError, match=key) as err:
        run_torchft_diloco(cfg, tmp_path / "out", seed=0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_matches_our_diloco_on_a_tiny_run(tiny_prep, tmp_path):
    pytest.importorskip("torchft", reason="torchft not installed (the optional extra: pip install -e '.[peers]')")
    from rich.console import Console

    from photon.bench.baselines.torchft import run_torchft_diloco
    from photon.federation.runner import run_federation
    from photon.federation.worker import ClientWorker
    from photon.transport.inprocess import InProcessTransport

    cfg = tiny_cfg(tiny_prep, *DILOCO)
    rec = run_torchft_diloco(cfg, tmp_path / "torchft", seed=0)
    assert rec["torchft_version"] == "0.2.0" and rec["replicas_agree"]
    assert len(rec["rounds_detail"]) == 2 and all(len(r["sync_s"]) == 2 for r in rec["rounds_detail"])
    assert rec["sync_s_per_round"] > 0 and rec["compute_s_per_round"] > 0
    assert (tmp_path / "torchft" / "torchft.json").is_file()

    ours = run_federation(cfg, tmp_path / "ours", InProcessTransport(ClientWorker(tmp_path / "node"), 2),
                          console=Console(quiet=True))
    # The same Δ up to fp32 rounding (all-reduced sum / K vs our running mean), then the same outer Nesterov.
    for domain, loss in ours["losses"].items():
        assert rec["losses"][domain] == pytest.approx(loss, rel=1e-4), domain
