"""The Flower edge: client tasks and replies to and from Flower `RecordDict`s.

All parameters travel as ONE flat fp32 array in an `ArrayRecord` (a numpy `.npy` buffer, loaded with
allow_pickle=False), with names and shapes in a JSON layout beside it: Flower moves every array as its own
objects and requests, so one array instead of one per tensor cuts a message's objects from dozens to a few.
Everything else travels as one JSON string in a `ConfigRecord`. fp32 only: ArrayRecord refuses bf16.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from photon.federation.task import ClientReply, ClientTask, Tensors

PARAMS, LAYOUT, TASK, REPLY = "params", "layout", "task", "reply"


def params_record(params: Tensors) -> ArrayRecord:
    """The parameters (sorted by name) concatenated into one float32 array; see `params_layout`."""
    names = sorted(params)
    flat = np.concatenate([params[n].detach().to(torch.float32).reshape(-1).numpy() for n in names]) \
        if names else np.zeros(0, np.float32)
    return ArrayRecord({"flat": Array(flat)})


def params_layout(params: Tensors) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps([[n, list(params[n].shape)] for n in sorted(params)])})


def record_params(record: ArrayRecord, layout: ConfigRecord) -> Tensors:
    """Views into one fresh array (np.load copies the message bytes once), checked against the layout."""
    flat = torch.from_numpy(record["flat"].numpy())
    out, offset = {}, 0
    for name, shape in json.loads(str(layout["json"])):
        n = int(np.prod(shape, dtype=np.int64))
        if offset + n > flat.numel():
            raise ValueError(f"parameter message too short for its layout at {name}")
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"parameter message has {flat.numel() - offset} values beyond its layout")
    return out


def task_content(task: ClientTask, params: ArrayRecord, layout: ConfigRecord) -> RecordDict:
    return RecordDict({PARAMS: params, LAYOUT: layout, TASK: ConfigRecord({"json": task.to_json()})})


def content_task(content: RecordDict) -> tuple[ClientTask, Tensors]:
    task = ClientTask.from_json(str(content[TASK]["json"]))
    return task, record_params(content[PARAMS], content[LAYOUT])


def reply_content(reply: ClientReply) -> RecordDict:
    return RecordDict({PARAMS: params_record(reply.params), LAYOUT: params_layout(reply.params),
                       REPLY: ConfigRecord({"json": reply.header_json()})})


def content_reply(content: RecordDict) -> ClientReply:
    return ClientReply.from_header(str(content[REPLY]["json"]), record_params(content[PARAMS], content[LAYOUT]))
