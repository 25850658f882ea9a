"""The trainer benchmark runs both arms and reports ratios and FLOP/s (speed itself is not asserted: shared CI
boxes)."""

import io

import pytest
from rich.console import Console

from photon.bench.throughput import flops_per_token, run_trainer_bench
from photon.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box


def test_trainer_bench_on_tiny_reports_both_arms_against_the_peak():
    cfg = load_config("tiny")
    out = io.StringIO()
    result = run_trainer_bench(cfg, steps=2, repeats=1, settings=("fp32", "bf16"),
                               console=Console(file=out, width=200), save=False, calibrate_s=0.2)
    for setting in ("fp32", "bf16"):
        row = result["rows"][setting]
        assert row["bare_tok_s"] > 0 and row["photon_tok_s"] > 0
        assert row["ratio"] == row["photon_tok_s"] / row["bare_tok_s"] and row["paired_ratio"] > 0
        assert row["model_flops"] == pytest.approx(row["photon_tok_s"] * flops_per_token(cfg))
        assert 0 < row["of_peak"] < 10
    assert result["peaks"]["fp32"] > 0 and result["peak_rss_mb"] > 0
    assert result["shape_ceilings"]["fp32"] > 0 and result["shape_ceilings"]["bf16"] > 0
    text = out.getvalue()
    assert "bare loop tok/s" in text and "photon / bare" in text and "median ratio within a repeat" in text


def test_each_setting_is_stored_as_it_ends_and_a_failed_one_does_not_lose_the_others(monkeypatch, tmp_path):
    """A GPU's time is scarce: a setting that fails is recorded with its error, and one that never ends (the
    time limit) leaves the settings before it stored."""
    import json

    from photon.bench import throughput

    monkeypatch.chdir(tmp_path)  # results go to ./docs/results
    real = throughput.measure_setting

    def measure(cfg, *args, **kwargs):
        if cfg.train.bf16 and cfg.train.compile:
            raise KeyboardInterrupt  # the time limit, mid-setting
        if cfg.train.bf16:
            raise RuntimeError("out of memory\nmore lines")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(throughput, "measure_setting", measure)
    peaks = {"fp32": 1e11, "bf16": 2e11}  # measured elsewhere: not what this test is about
    monkeypatch.setattr(throughput, "_peaks_and_ceilings", lambda *a: (dict(peaks), dict(peaks)))
    quiet = Console(file=io.StringIO(), width=200)
    with pytest.raises(RuntimeError, match=r"bf16 failed \(RuntimeError: out of memory\)"):
        run_trainer_bench(load_config("tiny"), steps=1, repeats=1, warmup=1, settings=("fp32", "bf16"),
                          console=quiet, calibrate_s=0.05)
    stored = json.loads((tmp_path / "docs/results/trainer-cpu.json").read_text())["data"]
    assert list(stored["rows"]) == ["fp32"] and stored["failed"] == {"bf16": "RuntimeError: out of memory"}
    assert stored["complete"] and "**bf16 failed**: RuntimeError: out of memory" in throughput.render(stored)
    record = tmp_path / "docs/results/trainer-cpu.json"
    finished = record.read_text()
    for left in (True, False):  # a finished run's record stays; without one, the interrupted run's part is stored
        with pytest.raises(KeyboardInterrupt):
            run_trainer_bench(load_config("tiny"), steps=1, repeats=1, warmup=1, settings=("fp32", "bf16+compile"),
                              console=quiet, calibrate_s=0.05)
        if left:
            assert record.read_text() == finished
            record.unlink()
    stored = json.loads((tmp_path / "docs/results/trainer-cpu.json").read_text())["data"]
    assert list(stored["rows"]) == ["fp32"] and not stored.get("complete")
    assert "**Incomplete run**: it stopped before bf16+compile" in throughput.render(stored)


@pytest.mark.parametrize("name, part", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10", "A10"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GH200 480GB", None), ("Tesla T4", None), (None, None)])
def test_a_gpu_is_found_in_the_datasheet_table_by_the_name_cuda_gives_it(name, part):
    from photon.bench.throughput import DATASHEET_BF16, datasheet_bf16

    assert datasheet_bf16(name) == (DATASHEET_BF16[part] if part else None)


def test_the_gpu_mfu_goal_is_judged_against_the_datasheet():
    from photon.bench.throughput import render

    row = {"bare_tok_s": 1.0, "photon_tok_s": 1.0, "ratio": 1.0, "paired_ratio": 1.0, "model_flops": 400e12,
           "of_peak": 0.5, "of_bf16_peak": 0.5}
    data = {"device_name": "NVIDIA H100 80GB HBM3", "device": "cuda", "threads": 1, "preset": "paper-125m",
            "params": 1e8, "flops_per_token": 1e9, "batch": 8, "seq_len": 2048, "peaks": {"fp32": 1, "bf16": 8e14},
            "repeats": 2, "steps": 10, "datasheet_bf16": 989.4e12, "rows": {"bf16": row}}
    assert "best 40.4%, met" in render(data)
    row["model_flops"] = 300e12
    assert "best 30.3%, NOT met" in render(data)


def test_the_shape_ceiling_times_every_linear_matmul_of_a_step():
    from photon.bench.throughput import linear_matmuls

    cfg = load_config("small")
    tokens = cfg.train.batch_size * cfg.train.seq_len
    flops = sum(2 * m * k * n * count for (m, k, n), count in linear_matmuls(cfg).items())
    attention = 12 * cfg.model.n_layer * cfg.model.d_model * cfg.train.seq_len
    assert flops == (flops_per_token(cfg) - attention) * tokens  # the Linear part of the model's FLOPs, exactly


def test_flops_per_token_counts_every_matmul_and_attention():
    cfg = load_config("tiny")
    m, T = cfg.model, cfg.train.seq_len
    per_layer = 4 * m.d_model**2 + 3 * m.d_model * m.hidden
    assert flops_per_token(cfg) == 6 * (m.n_layer * per_layer + m.vocab_size * m.d_model) + 12 * m.n_layer * m.d_model * T


def test_wire_bench_baselines_and_verdicts():
    from photon.bench.wire import loopback_mb_s, render

    assert loopback_mb_s(8 << 20) > 0 and loopback_mb_s(8 << 20, keep=True) > 0
    peaks = {"server": 250.0, "node": 450.0}
    data = {"preset": "p", "model_mb": 100.0, "socket_mb_s": 1000.0, "socket_kept_mb_s": 400.0, "runtime_mb": 20.0,
            "deployed": {"peaks_mb": peaks, "blob_fetch_s": [0.3, 0.2], "blob_upload_s": [0.25],
                         "tasks": [{"pull_s": 0.1, "run_s": 1.0, "push_s": 0.1}]},
            "simulated": {"peaks_mb": peaks}}
    text = render(data)
    assert "ServerApp 2.50×, met" in text and "deployed 4.50×, NOT met" in text and "4.30× above that" in text
    # the slower direction counts: 100 MB in 0.25 s = 400 MB/s, 40% of the socket, 100% of the kept copy
    assert "40.0% of it, NOT met" in text and "100.0% of that" in text
    assert "lean" not in text  # stored before the lean node's run existed: rendered as it was
    data["deployed_lean"] = {"node": "photon node --lean", "peaks_mb": {"node": 380.0},
                             "tasks": [{"pull_s": 0.1, "run_s": 3.0, "push_s": 0.1},
                                       {"pull_s": 0.1, "run_s": 2.0, "push_s": 0.1}]}
    text = render(data)
    assert "| deployed, lean node | node | 380 MB | 3.80× |" in text
    assert "started as `photon node --lean` (step in backward, activation checkpointing; a second deployed run, " \
           "the rest equal): 3.80×, met" in text
    assert "ran in 2.0 s at best there against 1.0 s" in text


def test_wire_bench_leaves_logs_and_drops_its_large_files(tmp_path):
    from photon.bench.wire import drop_large_files

    (tmp_path / "server/ckpt").mkdir(parents=True)
    (tmp_path / "server/ckpt/model.safetensors").write_bytes(bytes(3000))
    (tmp_path / "node.log").write_text("pulled in 0.1 s")
    assert drop_large_files(tmp_path, min_bytes=1000) == 3000
    assert not (tmp_path / "server/ckpt/model.safetensors").exists() and (tmp_path / "node.log").exists()


def test_a_benchmark_clears_only_an_out_folder_a_benchmark_made(tmp_path):
    from photon.bench.outdir import MARK, fresh_out_dir
    from photon.errors import UserError

    out = fresh_out_dir(tmp_path / "bench")  # made, marked
    (out / "old-run.log").write_text("")
    assert fresh_out_dir(out) == out and list(out.iterdir()) == [out / MARK]  # its own: cleared
    (tmp_path / "empty").mkdir()
    assert (fresh_out_dir(tmp_path / "empty") / MARK).is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="no photon benchmark made"):
        fresh_out_dir(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="is a file"):
        fresh_out_dir(mine / "notes.txt")


def test_bench_federation_checks_its_options_before_it_touches_out(photon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    code, _, _ = photon("bench", "federation", "--preset", "tiny", "--memory-preset", "paper125m",
                        "--out", victim)
    assert code == 2 and (victim / "notes.txt").exists()
    code, _, _ = photon("bench", "federation", "--preset", "tiny", "--out", victim)
    assert code == 2 and (victim / "notes.txt").exists()  # not a benchmark's folder: refused
