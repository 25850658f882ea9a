"""A node's worker on the CPU: the model is its own payload. The global model lands straight in the model's
parameters, rests on disk while the client trains, and the update is built where the parameters are, with the
same bits as a reply built in its own buffer."""

import numpy as np
import torch

from conftest import tiny_cfg
from photon.federation import codec
from photon.federation.codec import Payload
from photon.federation.protocol import UPDATE, decode_reply
from photon.federation.worker import ClientWorker, ParkedModel, lay_out_parameters
from photon.model.transformer import Transformer
from test_distributed import _task


def test_the_model_is_received_into_and_the_reply_built_in_its_own_memory(tiny_prep, tmp_path):
    task, wire, layouts = _task(tiny_prep)
    plain = decode_reply(ClientWorker(tmp_path / "a").handle(wire), task, *layouts)

    task, wire, layouts = _task(tiny_prep)
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
