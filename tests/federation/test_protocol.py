"""What travels: tasks and replies survive the Flower records bit for bit, and a reply that is malformed,
oversized, truncated or that lies about its task is rejected with a reason before anything else happens."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from photon.digest import tensors_digest
from photon.federation import codec
from photon.federation.codec import CodecError, Payload
from photon.federation.protocol import (
    STATE,
    UPDATE,
    ClientReply,
    ClientTask,
    Rejected,
    Wire,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
)
from photon.transport.records import content_to_wire, wire_to_content


def _params():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g),
            "c.scale": torch.randn((), generator=g)}


LAYOUT = codec.layout_of(_params())


def _task(**kw):
    base = dict(task_id="r0-c3-a1-0", run_id="abc123", client_id=3, round=0, global_step=16, cursor=8,
                local_steps=4, schedule_steps=32, batch_size=2, spans=[{"domain": "d", "start": 0, "end": 9}],
                config={"name": "tiny"})
    return ClientTask(**{**base, **kw})


def _reply(task, **kw):
    base = dict(task_id=task.task_id, client_id=task.client_id, round=task.round, samples=task.samples,
                steps=task.local_steps, cursor=task.next_cursor, loss=5.5, train_seconds=1.25, update=_params())
    return ClientReply(**{**base, **kw})


def test_task_round_trip_through_flower_records_is_exact():
    task, params = _task(), _params()
    wire = content_to_wire(wire_to_content(encode_task(task, codec.encode(params))))
    assert decode_task(wire) == task
    got = codec.decode(wire.payloads["model"], LAYOUT)
    assert all(torch.equal(got[k], v) for k, v in params.items())


def test_reply_round_trip_derives_progress_from_the_task():
    task = _task()
    back = decode_reply(content_to_wire(wire_to_content(encode_reply(_reply(task)))), task, LAYOUT, None)
    assert (back.samples, back.steps, back.cursor) == (8, 4, 16)
    assert all(torch.equal(back.update[k], v) for k, v in _params().items())


@pytest.mark.parametrize("field,value,match", [
    ("samples", 8 * 10**6, "samples"), ("steps", 4000, "steps"), ("cursor", 0, "cursor"),
    ("round", 1, "round"), ("client_id", 4, "client_id"), ("task_id", "r0-c3-a0-9", "task_id"),
    ("loss", float("nan"), "non-finite")])
def test_a_header_that_disagrees_with_the_task_is_rejected(field, value, match):
    task = _task()
    with pytest.raises(Rejected, match=match):
        decode_reply(encode_reply(_reply(task, **{field: value})), task, LAYOUT, None)


def _tampered(task, edit):
    wire = encode_reply(_reply(task))
    edit(wire)
    return wire


@pytest.mark.parametrize("edit,match", [
    (lambda w: setattr(w, "header", w.header[:20]), "malformed"),
    (lambda w: setattr(w, "header", json.dumps({**json.loads(w.header), "extra": 1})), "malformed"),
    (lambda w: setattr(w, "header", json.dumps({**json.loads(w.header), "samples": "8"})), "malformed"),
    (lambda w: w.payloads.pop(UPDATE), "no update"),
    (lambda w: setattr(w.payloads[UPDATE], "data", w.payloads[UPDATE].data[:-4]), "truncated"),
    (lambda w: setattr(w.payloads[UPDATE], "data", np.zeros(10**6, np.uint8)), "oversized"),
    (lambda w: w.payloads[UPDATE].layout["tensors"].pop(), "lacks"),
    (lambda w: w.payloads[UPDATE].layout["tensors"][0].__setitem__(1, [5, 1]), "shape"),
    (lambda w: w.payloads[UPDATE].layout.__setitem__("codec", "pickle"), "unknown codec"),
    (lambda w: setattr(w.payloads[UPDATE], "data", w.payloads[UPDATE].data.view(np.float32)), "uint8"),
    (lambda w: w.payloads.__setitem__("extra", w.payloads[UPDATE]), "unexpected payloads"),
    (lambda w: w.payloads.__setitem__(STATE, w.payloads[UPDATE]), "did not ask"),
])
def test_a_malformed_reply_is_rejected_with_a_reason(edit, match):
    task = _task()
    with pytest.raises(Rejected, match=match):
        decode_reply(_tampered(task, edit), task, LAYOUT, None)


def test_a_non_finite_update_decodes_but_the_buffer_refuses_it(tmp_path):
    from photon.federation.fold import ReplyBuffer

    task = _task()
    update = _params()
    update["a.bias"][0] = float("nan")
    reply = decode_reply(encode_reply(_reply(task, update=update)), task, LAYOUT, None)
    with pytest.raises(ValueError, match="non-finite"):
        ReplyBuffer(tmp_path, LAYOUT).add((0,), 3, reply.update, 1.0)


def test_an_uploaded_state_must_match_its_digest():
    task = _task(upload_state=True)
    state = {"x.step": torch.tensor(3.0)}
    layout = codec.layout_of(state)
    good = _reply(task, state=state, state_digest=tensors_digest(state))
    assert decode_reply(encode_reply(good), task, LAYOUT, layout).state_digest == tensors_digest(state)
    bad = _reply(task, state=state, state_digest="0" * 64)
    with pytest.raises(Rejected, match="digest"):
        decode_reply(encode_reply(bad), task, LAYOUT, layout)
    with pytest.raises(Rejected, match="lacks"):
        decode_reply(encode_reply(_reply(task)), task, LAYOUT, layout)


@pytest.mark.parametrize("records,match", [
    ({}, "lacks"),
    ({"header": ConfigRecord({"json": "{}"}), "payloads": ArrayRecord({}), "layouts": ConfigRecord({"x": "{}"})},
     "differ"),
    ({"header": ConfigRecord({"json": "{}"}), "payloads": ArrayRecord({"update": Array(np.zeros(3, np.float64))}),
      "layouts": ConfigRecord({"update": "{}"})}, "not raw bytes"),
    ({"header": ConfigRecord({"json": "{}"}),
      "payloads": ArrayRecord({"update": Array(dtype="uint8", shape=(9,), stype="raw", data=b"123")}),
      "layouts": ConfigRecord({"update": "{}"})}, "not raw bytes"),
    ({"header": ConfigRecord({"json": "{}"}),
      "payloads": ArrayRecord({"update": Array(dtype="uint8", shape=(3,), stype="raw", data=b"123")}),
      "layouts": ConfigRecord({"update": "not json"})}, "not JSON"),
])
def test_malformed_flower_records_are_codec_errors(records, match):
    with pytest.raises(CodecError, match=match):
        content_to_wire(RecordDict(records))


def test_payload_bytes_travel_raw_without_npy_wrapping():
    wire = Wire("{}", {"update": Payload({"codec": "fp32", "tensors": []}, np.arange(7, dtype=np.uint8))})
    array = wire_to_content(wire)["payloads"]["update"]
    assert array.stype == "raw" and array.data == bytes(range(7))
