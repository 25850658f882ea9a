"""Crash safety of the server process: `kill -9` mid-run, then `photon run --resume` finishes the run with
parameters bitwise equal to an uninterrupted run (at most the round in flight is lost)."""

import os
import signal
import subprocess
import sys
import time

from photon.checkpoint import list_checkpoints
from photon.digest import tensors_digest
from photon.federation.server_state import ServerState
from photon.runlog import read_metrics
from tests.helpers import fed_cfg, run


def _photon(*args):
    return [sys.executable, "-m", "photon.cli", *args]


def test_server_killed_mid_round_resumes_bitwise(tiny_prep, tmp_path):
    sets = [f"data.prep_dir={tiny_prep}", "data.partition.num_clients=3", "federation.clients_per_round=2",
            "federation.local_steps=16", "federation.rounds=5", "train.eval_batches=1", "train.threads=1",
            "train.warmup_steps=2"]
    reference = run(fed_cfg(tiny_prep, *sets[1:]), tmp_path / "reference")
    run_dir = tmp_path / "killed"
    cmd = _photon("run", "--preset", "tiny", "--engine", "inprocess", "--out", str(run_dir),
                  *[a for s in sets for a in ("--set", s)])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list_checkpoints(run_dir / "checkpoints")) < 2 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-round 3: round 2's checkpoint is the last
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(_photon("run", "--resume", str(run_dir), "--engine", "inprocess"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    state, _ = ServerState.load_latest(run_dir / "checkpoints")
    assert state.round == 5
    assert reference["params_sha"] == tensors_digest(state.params)
    assert [r["round"] for r in read_metrics(run_dir) if r["kind"] == "round"] == [1, 2, 3, 4, 5]
