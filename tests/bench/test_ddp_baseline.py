"""The real data-parallel baseline: 2 gloo processes on loopback train in lockstep."""

from photon.bench.baselines.ddp import run_ddp
from tests.helpers import tiny_cfg


def test_two_rank_gloo_ddp_ends_with_identical_parameters(tiny_prep, tmp_path):
    cfg = tiny_cfg(tiny_prep, "train.threads=1")
    report = run_ddp(cfg, tmp_path / "ddp", steps=4, world=2, timeout_s=300)
    assert len(report["digests"]) == 2 and report["digests"][0] == report["digests"][1]
    assert report["steps"] == 4 and report["world"] == 2
    # Every step all-reduces every gradient once: the unique fp32 parameters (tied embedding counted once).
    from photon.federation.protocol import tensor_bytes
    from photon.model.transformer import Transformer, unique_state_dict

    assert report["allreduce_bytes_per_step"] == tensor_bytes(unique_state_dict(Transformer(cfg.model)))
    assert report["comm_seconds"] > 0 and report["compute_seconds"] > 0
    assert (tmp_path / "ddp" / "rank1.json").exists()
