"""The Flower edge: client tasks and replies to and from Flower `RecordDict`s.

Tensors travel in an `ArrayRecord` (numpy `.npy` buffers, loaded with allow_pickle=False); everything else
travels as one JSON string in a `ConfigRecord`. fp32 only: ArrayRecord refuses bf16.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from photon.federation.task import ClientReply, ClientTask, Tensors

PARAMS, TASK, REPLY = "params", "task", "reply"


def params_record(params: Tensors) -> ArrayRecord:
    return ArrayRecord({k: v.detach().contiguous() for k, v in params.items()})


def record_params(record: ArrayRecord) -> Tensors:
    return {k: torch.from_numpy(a.numpy()) for k, a in record.items()}  # np.load gives a fresh, writable array


def task_content(task: ClientTask, params: ArrayRecord) -> RecordDict:
    return RecordDict({PARAMS: params, TASK: ConfigRecord({"json": task.to_json()})})


def content_task(content: RecordDict) -> tuple[ClientTask, Tensors]:
    return ClientTask.from_json(str(content[TASK]["json"])), record_params(content[PARAMS])


def reply_content(reply: ClientReply) -> RecordDict:
    return RecordDict({PARAMS: params_record(reply.params), REPLY: ConfigRecord({"json": reply.header_json()})})


def content_reply(content: RecordDict) -> ClientReply:
    return ClientReply.from_header(str(content[REPLY]["json"]), record_params(content[PARAMS]))
