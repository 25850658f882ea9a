"""A node's worker on the CPU: the model is its own payload. The global model lands straight in the model's
parameters, rests on disk while the client trains, and the update is built where the parameters are, with the
same bits as a reply built in its own buffer."""

from pathlib import Path

import numpy as np
import pytest
import torch

from photon.federation import codec
from photon.federation.codec import Payload
from photon.federation.protocol import UPDATE, decode_reply
from photon.federation.worker import ClientWorker, ParkedModel, lay_out_parameters
from photon.model.transformer import Transformer
from tests.helpers import assert_close_by_norm, first_task, tiny_cfg


def test_the_model_is_received_into_and_the_reply_built_in_its_own_memory(tiny_prep, tmp_path):
    task, wire, layouts = first_task(tiny_prep)
    plain = decode_reply(ClientWorker(tmp_path / "a").handle(wire), task, *layouts)

    task, wire, layouts = first_task(tiny_prep)
    worker, landed = ClientWorker(tmp_path / "b", reply_in_model=True), []

    def fetch(name: str, payload: Payload, into: np.ndarray | None) -> Payload:  # as the blob channel does
        if into is None or into.nbytes != payload.nbytes:
            return payload
        np.copyto(into, payload.data)
        landed.append(into)
        return Payload(payload.layout, into)

    reply_wire = worker.handle(wire, fetch)
    _, model, _, flat = worker._model
    model_bytes = codec.as_laid_out(flat)
    assert len(landed) == 1 and landed[0].ctypes.data == model_bytes.ctypes.data  # into the parameters
    assert all(p.data_ptr() == flat[n].data_ptr() for n, p in model.named_parameters())
    assert reply_wire.payloads[UPDATE].data.ctypes.data == model_bytes.ctypes.data  # the reply is the model's memory
    reply = decode_reply(reply_wire, task, *layouts)
    assert reply.update.keys() == plain.update.keys()
    assert all(torch.equal(reply.update[k], plain.update[k]) for k in plain.update)  # same bits either way
    assert reply.state_digest == plain.state_digest


def test_a_parked_model_gives_back_the_exact_difference(tmp_path):
    torch.manual_seed(0)
    flat = lay_out_parameters(Transformer(tiny_cfg("unused").model))
    start = {k: v.clone() for k, v in flat.items()}
    parked = ParkedModel(tmp_path)
    parked.SLAB = 4096  # many slabs, the last a partial one
    parked.park(codec.as_laid_out(flat))
    with torch.no_grad():
        for v in flat.values():
            v.mul_(0.9).add_(0.01)
    trained = {k: v.clone() for k, v in flat.items()}
    parked.subtract(codec.as_laid_out(flat))
    assert all(torch.equal(flat[k], start[k] - trained[k]) for k in flat)


def test_a_lean_node_replies_with_the_same_update_and_state(tiny_prep, tmp_path):
    """`photon node --lean` (step in backward, checkpointing) trains the run's recipe: the same update and
    AdamW state, bitwise, as a node without it (a run without micro-batches); with micro-batches, which a lean
    node does not split, within fp32 rounding."""
    for more, exact in (((), True), (("train.micro_batch_size=2",), False)):
        replies = []
        for lean in (False, True):
            task, wire, layouts = first_task(tiny_prep, *more)
            worker = ClientWorker(tmp_path / f"{lean}{more}", lean=lean)
            replies.append(decode_reply(worker.handle(wire), task, *layouts))
            assert worker._model[1].checkpoint_blocks == lean
        plain, lean_reply = replies
        for k, v in plain.update.items():
            if exact:
                assert torch.equal(lean_reply.update[k], v), k
            else:
                # micro-batches sum the gradient in another order: H AdamW steps carry that rounding on (measured:
                # at most 1.3e-5 of the norm)
                assert_close_by_norm(lean_reply.update[k], v, rel=1e-3, what=k)
        assert (lean_reply.state_digest == plain.state_digest) == exact


def test_photon_node_lean_reaches_the_worker(tmp_path, monkeypatch):
    """`photon node --lean` puts `lean=1` in the SuperNode's node config, and the ClientApp builds a lean worker
    from it (Flower parses the node config's values; an int here)."""
    from types import SimpleNamespace

    from photon.launch import processes, supernode
    from photon.transport import client_app

    started = []
    monkeypatch.setattr(supernode, "spawn", lambda args, *a, **k: started.append(args))
    supernode.start_supernode("127.0.0.1:9092", processes.free_port(), tmp_path / "node", insecure=True, lean=True)
    node_config = started[0][started[0].index("--node-config") + 1]
    assert " lean=1" in node_config
    client_app._workers.clear()
    for config, lean in (({"lean": 1}, True), ({}, False)):
        context = SimpleNamespace(run_id=len(config), node_config={"state-dir": str(tmp_path / "w"), **config})
        assert client_app._worker(context, str(tmp_path)).lean is lean
    client_app._workers.clear()


def test_a_node_short_of_memory_trains_lean_by_itself_with_the_same_update(tiny_prep, tmp_path, monkeypatch, caplog):
    """A node whose free memory is less than a client's estimate, but more than the lean estimate, trains
    lean without being told (`photon node --lean`'s recipe: the same update), and says so once per run."""
    from photon.config import build_config
    from photon.train import memory

    task, wire, layouts = first_task(tiny_prep)
    cfg = build_config({k: v for k, v in task.config.items() if k != "tokenizer_sha256"})
    need = memory.client_memory(cfg, procs=1)["total"]
    lean_need = memory.client_memory(memory.lean_config(cfg), procs=1)["total"]
    assert lean_need < need
    plain = decode_reply(ClientWorker(tmp_path / "plain").handle(wire), task, *layouts)

    monkeypatch.setattr(memory, "free_memory", lambda _: int((need + lean_need) / 2))
    worker = ClientWorker(tmp_path / "short")
    with caplog.at_level("WARNING", logger="photon.federation.worker"):
        for _ in range(2):
            task, wire, layouts = first_task(tiny_prep)
            reply = decode_reply(worker.handle(wire), task, *layouts)
    assert worker._model[1].checkpoint_blocks  # trained lean
    assert all(torch.equal(reply.update[k], v) for k, v in plain.update.items())
    said = [r.getMessage() for r in caplog.records if "trains the run lean" in r.getMessage()]
    assert len(said) == 1 and "photon node --lean" in said[0] and "the same updates, bitwise" in said[0]

    monkeypatch.setattr(memory, "free_memory", lambda _: int(2 * need))  # room again: the run stays lean here
    task, wire, layouts = first_task(tiny_prep)
    worker.handle(wire)
    assert worker._model[1].checkpoint_blocks
    worker = ClientWorker(tmp_path / "roomy")  # room enough from the start: the run's own way
    task, wire, layouts = first_task(tiny_prep)
    worker.handle(wire)
    assert not worker._model[1].checkpoint_blocks


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="free memory is read from Linux's /proc")
def test_free_memory_reads_this_machine():
    from photon.train.memory import device_memory, free_memory

    free = free_memory("cpu")
    assert free is not None and 0 < free <= device_memory("cpu") * 1.01


def test_a_node_keeps_its_replies_until_the_server_no_longer_needs_them(tmp_path):
    """A reply is kept whole (header, every payload's layout and bytes) by task id and comes back equal; the
    rounds the server says it will not ask about again are forgotten."""
    import numpy as np

    from photon.federation.client_state import NodeStateCache
    from photon.federation.codec import Payload
    from photon.federation.kept_replies import KeptReplies
    from photon.federation.protocol import ClientTask, Wire

    def task(round_, tid):
        return ClientTask(task_id=tid, run_id="abc123", client_id=0, round=round_, global_step=0, cursor=0,
                          local_steps=1, schedule_steps=1, batch_size=1, spans=[], config={})

    kept = KeptReplies(NodeStateCache(tmp_path))
    wire = Wire('{"task_id": "c0-d1"}', {"update": Payload({"codec": "fp32", "tensors": [["w", [3]]]},
                                                            np.arange(12, dtype=np.uint8)),
                                         "state": Payload({"codec": "fp32", "tensors": []}, np.zeros(0, np.uint8))})
    kept.keep(task(2, "c0-d1"), wire)
    kept.keep(task(5, "c0-d2"), wire)
    back = kept.load(task(2, "c0-d1"))
    assert back.header == wire.header and sorted(back.payloads) == sorted(wire.payloads)
    for name, p in wire.payloads.items():
        assert back.payloads[name].layout == p.layout and back.payloads[name].as_bytes() == p.as_bytes()
    kept.forget_before("abc123", 5)
    assert kept.load(task(2, "c0-d1")) is None and kept.load(task(5, "c0-d2")) is not None
    assert kept.load(task(7, "c9-d9")) is None
