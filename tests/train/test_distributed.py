"""A client trained by 2 processes (gloo on CPU) is the client trained by 1: DDP and FSDP2 end within fp32
rounding of the one-process client, its kept AdamW state follows it and a resumed run stays bitwise exact,
a rank killed mid-task is an error reply (the server re-queues the client), a batch that does not split is
one line. One rank is bitwise `train_local`: the files and the sharded kept state lose nothing.

The tolerance: splitting a batch's mean loss over two ranks and averaging their gradients (an all-reduce, or
FSDP2's reduce-scatter) rounds differently from one mean over the batch (a few ulp), and AdamW's g/√v step
carries that into the update and the moments. Measured, largest per-tensor relative L2 difference after 4
steps: DDP 2e-7 (update and state), FSDP2 2e-6 (update) and 1.5e-6 (state); without micro-batches or from a
fresh state up to 6e-6. We allow 1e-4; a lost state or an unsynced gradient is off by O(1).
"""

import logging
import shutil
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from photon.data.partition import make_partition, spans_stream
from photon.data.shards import open_prepared
from photon.errors import UserError
from photon.federation import codec
from photon.federation.protocol import MODEL, decode_reply, encode_task
from photon.federation.runner import run_federation
from photon.federation.server_state import ServerState
from photon.federation.worker import ClientWorker
from photon.model.transformer import (
    Transformer,
    load_unique_state_dict,
    unique_state_dict,
)
from photon.runlog import read_metrics
from photon.train.device import place, resolve_device
from photon.train.distributed import StreamSpec, train_ranks
from photon.train.local import make_optimizer, optimizer_state_tensors, train_local
from photon.transport.inprocess import InProcessTransport
from tests.helpers import fed_cfg, first_task, tiny_cfg, torch_threads

RTOL = 1e-4


def one_task_update(prep, node_dir, procs, device="cpu", *overrides):
    """The update of client 0's first task on a node with `procs` processes on `device` (test_gpu.py uses it
    on two GPUs)."""
    task, wire, layouts = first_task(prep, f"train.device={device}", *overrides)
    return decode_reply(ClientWorker(node_dir, procs=procs).handle(wire), task, *layouts).update


def _second_round(tmp_path, prep, procs, *overrides):
    """Client 0's second round, from the model and AdamW state its first round (one process) left, with that
    state attached to the task as the server sends it to a node that lacks it: the decoded reply."""
    first, wire, layouts = first_task(prep, *overrides)
    start = codec.decode(wire.payloads[MODEL], layouts[0])
    one = ClientWorker(tmp_path / "first", procs=1)
    r1 = decode_reply(one.handle(wire), first, *layouts)
    task = replace(first, task_id="c0-d2", round=1, global_step=first.local_steps, cursor=first.next_cursor,
                   state_digest=r1.state_digest)
    wire = encode_task(task, codec.encode({k: start[k] - r1.update[k] for k in start}), codec.encode(r1.state))
    return decode_reply(ClientWorker(tmp_path / f"node{procs}", procs=procs).handle(wire), task, *layouts)


def _rel(a: dict, b: dict) -> float:
    """The largest per-tensor relative L2 difference."""
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)).item() for k in a)


def _check_same(one, two):
    assert (two.samples, two.steps, two.cursor) == (one.samples, one.steps, one.cursor) == (32, 4, 64)
    assert _rel(one.update, two.update) < RTOL
    assert one.state.keys() == two.state.keys() and _rel(one.state, two.state) < RTOL  # gathered whole
    assert all(torch.equal(one.state[k], two.state[k]) for k in one.state if k.endswith(".step"))
    assert two.loss == pytest.approx(one.loss, rel=1e-5)


def test_a_two_process_ddp_client_equals_a_one_process_client(tiny_prep, tmp_path):
    # Micro-batches of 2: each rank accumulates two without syncing (DDP no_sync), then one all-reduce.
    over = ("train.sharding=ddp", "train.micro_batch_size=2")
    _check_same(_second_round(tmp_path, tiny_prep, 1, *over), _second_round(tmp_path, tiny_prep, 2, *over))


def test_a_two_process_fsdp2_client_equals_a_one_process_client(tiny_prep, tmp_path):
    # The kept state is sharded onto the ranks and gathered back. grad_clip 0.05 clips every step, so this also
    # checks that the clip sees the global norm of the sharded gradients, not each rank's shard.
    over = ("train.sharding=fsdp", "train.micro_batch_size=2", "train.grad_clip=0.05")
    one = _second_round(tmp_path, tiny_prep, 1, *over)
    _check_same(one, _second_round(tmp_path, tiny_prep, 2, *over))
    unclipped = _second_round(tmp_path / "noclip", tiny_prep, 1, *over[:2])
    assert _rel(one.update, unclipped.update) > 100 * RTOL  # the clip did act


def test_kept_state_follows_a_two_process_client_and_a_resume_is_bitwise_exact(tiny_prep, tmp_path):
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=1", "federation.clients_per_round=1",
                  "federation.rounds=2", "federation.client_optimizer=persist", "train.threads=1",
                  "federation.state_backup_every=1")  # every state on the server: a move is exact

    def run(name, worker, **kw):
        return run_federation(cfg, tmp_path / name, InProcessTransport(worker), **kw)

    def final(name):
        state, _ = ServerState.load_latest(tmp_path / name / "checkpoints")
        digest = state.clients[0].state_digest
        return state.params, load_file(tmp_path / name / "client_state" / f"{digest}.safetensors"), digest

    run("one", ClientWorker(tmp_path / "nodes" / "one", procs=1))
    node = ClientWorker(tmp_path / "nodes" / "two", procs=2)
    run("two", node, stop_after=1)
    shutil.copytree(tmp_path / "two", tmp_path / "moved")  # the same checkpoint, resumed twice:
    two = run("two", node, resume=True)  # on the node that holds the client's state,
    moved = run("moved", ClientWorker(tmp_path / "nodes" / "fresh", procs=2), resume=True)  # on one without it
    (p1, s1, _), (p2, s2, d2) = final("one"), final("two")
    assert _rel(p1, p2) < RTOL  # K = 1 and FedAvg at lr 1: θ is the client's θ_k
    assert s1.keys() == s2.keys() and _rel(s1, s2) < RTOL  # the same AdamW state, gathered whole
    assert moved["params_sha"] == two["params_sha"] and final("moved")[2] == d2  # the server's copy, exactly
    assert sum(r.get("bytes_state_down", 0) for r in read_metrics(tmp_path / "moved") if r["kind"] == "round") > 0


def test_a_killed_rank_is_an_error_reply_at_once_and_the_client_trains_elsewhere(tiny_prep, tmp_path, caplog):
    cfg = fed_cfg(tiny_prep, "data.partition.num_clients=2", "federation.rounds=1", "train.threads=1",
                  "federation.local_steps=8", "federation.faults.kill_rank=1")
    nodes = [ClientWorker(tmp_path / "a", procs=1), ClientWorker(tmp_path / "b", procs=2)]  # b has the bad GPU
    times = []

    class Timed(InProcessTransport):
        def run(self, node, wire):
            start = time.monotonic()
            try:
                return super().run(node, wire)
            finally:
                times.append((node, time.monotonic() - start))

    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        summary = run_federation(cfg, tmp_path / "run", Timed(nodes))
    assert summary["rounds"] == 1
    (rnd,) = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "round"]
    assert rnd["ok"] == 2 and rnd["failed"] == 1  # re-queued within the round, trained by node a
    assert "(node 1): RuntimeError: rank 1 of 2 died of SIGKILL during local training" in caplog.text
    assert [t for n, t in times if n == 1][0] < 60  # the dead rank's partner was stopped, not waited for
    assert list((tmp_path / "b" / "ranks").iterdir()) == []  # the task's files are gone


# Stand-in ranks for the worker's watch: each prints a line, may write its closing marker, then ends as told.
_STAND_IN = """
import os, sys, time
folder, rank = sys.argv[-3], int(sys.argv[-2])
end = {ends!r}[rank]
print("rank", rank, "says", end, flush=True)
if end in ("done", "done-abort"):
    open(os.path.join(folder, f"rank{{rank}}.done"), "w").close()
if end == "slow-done":
    time.sleep(0.5)
    open(os.path.join(folder, f"rank{{rank}}.done"), "w").close()
if end.endswith("abort"):
    os.abort()
"""


@pytest.mark.parametrize("ends,error", [
    (("done", "done-abort"), None),  # died in its teardown, every rank past the closing barrier: kept
    (("slow-done", "done-abort"), None),  # the partner is still writing its marker when the first dies
    (("slow-done", "abort"), "rank 1 of 2 died of SIGABRT during local training (its last output: rank 1 says abort)"),
])
def test_a_rank_that_dies_after_the_closing_barrier_costs_nothing_one_that_dies_before_is_an_error(
        tmp_path, monkeypatch, caplog, ends, error):
    import subprocess

    from photon.train import distributed

    real = subprocess.Popen

    def stand_in(args, **kw):
        return real([sys.executable, "-c", _STAND_IN.format(ends=ends), *args[-3:]], **kw)

    monkeypatch.setattr(distributed.subprocess, "Popen", stand_in)
    with caplog.at_level(logging.WARNING, logger="photon.train.distributed"):
        if error is None:
            distributed._run_ranks(tmp_path, 2, 1, torch.device("cpu"), timeout=60)
            assert ("rank 1 of 2 died of SIGABRT in its teardown, after the task was complete "
                    "(its last output: rank 1 says done-abort); the result is kept") in caplog.text
        else:
            with pytest.raises(RuntimeError) as e:
                distributed._run_ranks(tmp_path, 2, 1, torch.device("cpu"), timeout=60)
            assert str(e.value) == error


@pytest.mark.parametrize("procs,micro,match", [(3, None, "train.batch_size=8 does not split over 3 processes"),
                                               (2, 8, "and train.micro_batch_size=8")])
def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tiny_prep, tmp_path, procs, micro, match):
    _, wire, _ = first_task(tiny_prep, *([f"train.micro_batch_size={micro}"] if micro else []))
    with pytest.raises(UserError, match=match) as e:
        ClientWorker(tmp_path / "node", procs=procs).handle(wire)
    assert "\n" not in str(e.value) and "federation.procs_per_node" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# One rank against train_local: the plumbing alone (files, the kept state sharded onto the ranks and gathered
# back), and on a CUDA machine the NCCL path (rank r on GPU r, fused AdamW on sharded parameters, sharding
# auto), which any CUDA machine can check; test_gpu.py compares two GPUs with one where there are two.


def one_rank_against_train_local(prep, work_dir, device, sharding):
    """Two rounds of client 0 through one rank (`train_ranks`, the second from the first's AdamW state) and
    through `train_local` on the same device: the parameters and AdamW states, both on the CPU."""
    cfg = tiny_cfg(prep, f"train.device={device}", f"train.sharding={sharding}", "train.warmup_steps=2",
                   "train.threads=1", f"federation.round_timeout_s={40 if device == 'cuda' else 600}")  # a rank stuck in NCCL: fail
    spans = make_partition(open_prepared(prep).manifest, cfg.data.partition)["clients"][0]["spans"]
    torch.manual_seed(0)
    start = unique_state_dict(Transformer(cfg.model))
    out = []
    for ranks in (False, True):
        model = Transformer(cfg.model)  # with ranks, the worker's copy: on the CPU
        load_unique_state_dict(model, start)
        trainable = model if ranks else place(model, cfg.train, resolve_device(device))
        optimizer = make_optimizer(model, cfg.train)
        stream = spans_stream(open_prepared(prep), spans, cfg.train.seq_len, cfg.train.batch_size, 0)
        spec = StreamSpec(str(prep), spans, cfg.train.batch_size, 0)
        for cursor, step in ((0, 0), (32, 4)):
            if ranks:
                train_ranks(model, optimizer, cfg, spec, cursor, step, 4, 32, 1, work_dir)
            else:
                train_local(trainable, optimizer, stream, cursor, step, 4, cfg.train, 32)
        out.append(({k: v.detach().cpu() for k, v in unique_state_dict(model).items()},
                    optimizer_state_tensors(model, optimizer)))
    return out


@pytest.mark.parametrize("device,sharding", [("cpu", "fsdp"), *[pytest.param("cuda", s, marks=pytest.mark.gpu)
                                                                  for s in ("ddp", "fsdp", "auto")]])
def test_one_rank_trains_as_train_local_does(tiny_prep, tmp_path, device, sharding):
    with torch_threads(1):  # the rank's threads: on the CPU the two are then bitwise equal
        (p1, s1), (p2, s2) = one_rank_against_train_local(tiny_prep, tmp_path, device, sharding)
    assert s1.keys() == s2.keys()
    for a, b in ((p1, p2), (s1, s2)):
        for k, v in a.items():
            if device == "cpu":
                assert torch.equal(b[k], v), k
            else:
                torch.testing.assert_close(b[k], v, rtol=1e-3, atol=1e-5)


def test_ddp_is_told_not_to_sync_buffers_in_the_installed_torchs_words(monkeypatch):
    """torch 2.13 renamed DDP's `broadcast_buffers` to `forward_sync_buffers`; an older torch (a GPU image's)
    knows only the old name and would refuse the new one."""
    import torch.nn.parallel

    from photon.train.distributed import _no_buffer_sync

    assert _no_buffer_sync() == {"forward_sync_buffers": False}  # the pinned torch

    class OlderDDP:  # torch 2.11's keywords
        def __init__(self, module, device_ids=None, broadcast_buffers=True, init_sync=True):
            pass

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", OlderDDP)
    assert _no_buffer_sync() == {"broadcast_buffers": False}
