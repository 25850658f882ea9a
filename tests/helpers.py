"""Helpers shared by the tests: configs, in-process runs, crash hooks and comparisons."""

import contextlib
from pathlib import Path

import torch

from photon.config import config_to_dict, load_config
from photon.data.partition import make_partition
from photon.data.shards import open_prepared
from photon.federation import codec
from photon.federation.client_state import optimizer_state_layout
from photon.federation.protocol import ClientTask, encode_task
from photon.federation.runner import run_federation
from photon.federation.worker import ClientWorker
from photon.model.transformer import Transformer, unique_state_dict
from photon.transport.inprocess import InProcessTransport

FIXTURE_CORPUS = Path(__file__).parent / "fixtures" / "corpus"


def assert_close_by_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """`actual` equals `expected` up to a difference whose L2 norm is at most `rel` times `expected`'s norm.

    Element-wise tolerances judge a near-zero element by its own size, so they pass on one CPU's kernels and
    fail on another's, where a different summation order moved that element by a rounding step. The norm of the
    difference against the tensor's norm is what fp32 rounding bounds on any machine."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    assert diff <= rel * scale or diff == 0.0, f"{what}: |difference| {diff:.3g} > {rel:g} x |expected| {scale:.3g}"


def encoded_size(layout, spec) -> int:
    """Bytes a payload of `layout` (name, shape pairs) takes under the codec `spec`: every codec's size depends
    only on the shapes, so encoding zeros tells."""
    return codec.encode({name: torch.zeros(shape) for name, shape in layout}, spec).nbytes


class ServerCrash(Exception):
    """The server process dying, raised from a transport's `fail` hook (see `crash_when`)."""


def crash_when(predicate):
    """A transport `fail` hook: the server dies (ServerCrash) as it hands out the first task `predicate`
    accepts, e.g. `crash_when(lambda t: t.round == 2)`: nothing of that round is committed."""

    def hook(task):
        if predicate(task):
            raise ServerCrash
        return None

    return hook


def tiny_cfg(prep_dir, *overrides: str, preset: str = "tiny"):
    """The `tiny` preset (or `preset`) reading data from `prep_dir`, plus `key=value` overrides."""
    return load_config(preset, [f"data.prep_dir={prep_dir}", *overrides])


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on `n` intra-op threads inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fed_cfg(prep: Path, *overrides: str):
    """A small federation on the tiny corpus: 3 clients, 2 a round, H=4, 3 rounds, plus overrides."""
    base = [f"data.prep_dir={prep}", "data.partition.num_clients=3", "federation.clients_per_round=2",
            "federation.local_steps=4", "federation.rounds=3", "train.eval_batches=2", "train.warmup_steps=2"]
    return load_config("tiny", base + list(overrides))


def run(cfg, run_dir, nodes=1, fail=None, **kwargs):
    """`cfg`'s federation in this process on `nodes` in-process nodes; `fail`: a transport fault hook."""
    transport = InProcessTransport(ClientWorker(run_dir / "node"), nodes, fail=fail)
    return run_federation(cfg, run_dir, transport, **kwargs)


def first_task(prep, *overrides, steps=4):
    """Client 0's first task (round 0, a fresh model), its wire, and the model and state layouts. Its client
    keeps its AdamW state (`persist`) and uploads it, so replies carry the new state."""
    cfg = tiny_cfg(prep, "train.threads=1", "train.warmup_steps=2", "federation.client_optimizer=persist",
                   *overrides)
    torch.manual_seed(0)
    params = unique_state_dict(Transformer(cfg.model))
    spans = make_partition(open_prepared(prep).manifest, cfg.data.partition)["clients"][0]["spans"]
    task = ClientTask(task_id="c0-d1", run_id="run0", client_id=0, round=0, global_step=0, cursor=0,
                      local_steps=steps, schedule_steps=8 * steps, batch_size=cfg.train.batch_size, spans=spans,
                      config=config_to_dict(cfg), client_optimizer="persist", upload_state=True)
    layout = codec.layout_of(params)
    return task, encode_task(task, codec.encode(params)), (layout, optimizer_state_layout(layout))
