"""The Flower edge: parameters travel as one flat array plus a layout, and come back exactly."""

import pytest
import torch

from photon.federation.messages import (content_reply, content_task, params_layout, params_record, reply_content,
                                        task_content)
from photon.federation.task import ClientReply, ClientTask


def _params():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g),
            "c.scale": torch.randn((), generator=g)}


def test_task_round_trip_is_exact_and_one_array():
    params = _params()
    record = params_record(params)
    assert list(record) == ["flat"]  # one array, whatever the number of tensors
    task = ClientTask(3, 1, 16, 8, 4, 32, [{"domain": "d", "start": 0, "end": 9}], {"name": "tiny"})
    got_task, got = content_task(task_content(task, record, params_layout(params)))
    assert got_task == task
    assert set(got) == set(params)
    for name, t in params.items():
        assert got[name].shape == t.shape and torch.equal(got[name], t)


def test_reply_round_trip_is_exact():
    reply = ClientReply(2, 0, samples=64, steps=8, cursor=64, loss=5.5, train_seconds=1.25, params=_params())
    back = content_reply(reply_content(reply))
    assert back.header_json() == reply.header_json()
    assert all(torch.equal(back.params[k], v) for k, v in reply.params.items())


def test_a_layout_that_does_not_match_is_refused():
    params = _params()
    bigger = dict(params, extra=torch.zeros(2))
    with pytest.raises(ValueError, match="too short"):
        content_task(task_content(ClientTask(0, 0, 0, 0, 1, 1, [], {}), params_record(params), params_layout(bigger)))
    smaller = {k: v for k, v in params.items() if k != "a.bias"}
    with pytest.raises(ValueError, match="beyond its layout"):
        content_task(task_content(ClientTask(0, 0, 0, 0, 1, 1, [], {}), params_record(params),
                                  params_layout(smaller)))
