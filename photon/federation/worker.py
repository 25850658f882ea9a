"""A node's worker: trains whichever logical client a task names, with the foundation's local trainer.

Wire in, wire out (`handle`): both engines call it with the same bytes, so the checks the server runs on a
reply are the same in tests and in deployment. It keeps the model and the memmapped data warm across tasks,
and caches kept client state (`client_state.NodeStateCache`), but nothing it holds is used unless the task
names it: the server owns each client's progress. Engine-free.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from photon.config import RunConfig, build_config
from photon.data.partition import client_seed, spans_stream
from photon.data.shards import Prepared, open_prepared
from photon.digest import tensors_digest
from photon.errors import UserError
from photon.federation import codec, compressed_updates
from photon.federation.client_state import (
    MissingBaseModel,
    NodeStateCache,
    client_state_layout,
)
from photon.federation.codec import CodecError
from photon.federation.faults import (
    corrupt_reply,
    corrupt_wire,
    maybe_fail,
    task_timing,
)
from photon.federation.kept_replies import NOT_KEPT, KeptReplies
from photon.federation.protocol import (
    MODEL,
    STATE,
    ClientReply,
    ClientTask,
    NodeUnfit,
    Wire,
    decode_task,
    encode_reply,
    lost_reply,
)
from photon.model.transformer import (
    Transformer,
    load_unique_state_dict,
    unique_state_dict,
)
from photon.train import distributed
from photon.train.device import (
    place,
    release_freed_memory,
    resolve_device,
    setup_backend,
)
from photon.train.local import (
    lean_config,
    load_optimizer_state_tensors,
    make_optimizer,
    optimizer_state_tensors,
    train_local,
)

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
Fetch = Callable[[str, codec.Payload, "np.ndarray | None"], codec.Payload]  # (name, payload, into) -> in memory


def _in_message(name: str, payload: codec.Payload, into: np.ndarray | None) -> codec.Payload:
    return payload  # the engine delivered the bytes with the message


def lay_out_parameters(model: torch.nn.Module) -> Tensors:
    """Move a CPU fp32 model's parameters into one buffer laid out exactly as the fp32 payload of its
    `unique_state_dict` (`codec.laid_out`); returns those views. The model is then its own payload: the global
    model can be received straight into it, and an update computed in it encodes without a copy."""
    params = dict(model.named_parameters())  # unique: a tied head is the embedding
    flat = codec.laid_out(codec.layout_of(params))
    with torch.no_grad():
        for name, view in flat.items():
            view.copy_(params[name])
            params[name].data = view
    return flat


class ParkedModel:
    """The global model a task started from, resting in an unnamed file (its page cache, reclaimable) while the
    client trains, instead of a model's worth of the node's memory; read back a slab at a time to turn the
    trained parameters into the update. The file is reused task after task (its pages stay warm) and vanishes
    with the process."""

    SLAB = 16 << 20

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder)
        self._slab = np.empty(self.SLAB, np.uint8)
        self.nbytes = 0

    def park(self, data: np.ndarray) -> None:
        view, fd = memoryview(data).cast("B"), self._file.fileno()
        for at in range(0, len(view), self.SLAB):
            os.pwrite(fd, view[at:at + self.SLAB], at)
        if os.fstat(fd).st_size > len(view):
            os.ftruncate(fd, len(view))
        self.nbytes = len(view)

    def subtract(self, trained: np.ndarray) -> None:
        """`trained` (fp32 bytes laid out as the parked model) becomes parked − trained, in place."""
        if trained.nbytes != self.nbytes:
            raise ValueError(f"{trained.nbytes} bytes trained, {self.nbytes} parked")
        out = torch.from_numpy(trained).view(torch.float32)
        slab = torch.from_numpy(self._slab).view(torch.float32)
        fd = self._file.fileno()
        for at in range(0, self.nbytes, self.SLAB):
            n = os.preadv(fd, [memoryview(self._slab)[:min(self.SLAB, self.nbytes - at)]], at)
            a, b = at // 4, (at + n) // 4
            torch.sub(slab[:b - a], out[a:b], out=out[a:b])






class ClientWorker:
    def __init__(self, state_dir: Path | None = None, data_dir: Path | None = None, real_time_faults: bool = True,
                 slowdown: float = 1.0, procs: int | None = None, reply_in_model: bool = False,
                 lean: bool = False):
        """`state_dir` caches kept client state; `data_dir` overrides the task's prep_dir (a node's own data).
        `real_time_faults`: slow and late tasks really sleep and lost replies raise (Flower, real-time
        engines); the virtual-clock engine models them itself and turns this off. `slowdown`: this node takes
        that many times as long per task (a drill knob for a deployment: older hardware). `procs`: processes
        that train each client together (`photon node --procs`; None = the run's federation.procs_per_node).
        `reply_in_model`: a CPU model's reply may be built in the model's own memory (no model-sized copy), for
        an engine that has sent it before it hands this worker another task (Flower's ClientApp); elsewhere
        the reply gets its own buffer. `lean`: this node trades compute for memory (`photon node --lean`,
        `local.lean_config`), whatever the run's config says; its updates are the same. Without it, a node of
        one process per client does so for a run whose client would not fit its free memory otherwise."""
        self.cache = NodeStateCache(Path(state_dir) if state_dir else Path(".photon-node"))
        self.replies = KeptReplies(self.cache)
        self.data_dir = data_dir
        self.real_time_faults = real_time_faults
        self.slowdown = slowdown
        self.procs = procs
        self.reply_in_model = reply_in_model
        self.lean = lean
        self._prepared: dict[str, Prepared] = {}
        # key, module, what to call, the parameters laid out as a payload (CPU fp32) or None
        self._model: tuple[str, Transformer, torch.nn.Module, Tensors | None] | None = None
        self._parked: ParkedModel | None = None
        self._lean_runs: set[str] = set()  # the run configs this node went lean for

    def prepared(self, prep_dir: str, tokenizer_sha: str | None) -> Prepared:
        """This node's data for the run; `NodeUnfit` when it has none, or data tokenized otherwise than the
        server's (no client can train here then)."""
        key = str(self.data_dir or prep_dir)
        if key not in self._prepared:
            try:
                self._prepared[key] = open_prepared(Path(key))
            except UserError as e:
                raise NodeUnfit(str(e)) from None
        prepared = self._prepared[key]
        if tokenizer_sha and prepared.manifest.get("tokenizer_sha256") != tokenizer_sha:
            raise NodeUnfit(f"the data at {key} was tokenized with another tokenizer than the server's (prepared "
                            "from other text, with another recipe, or by another Photon or Python version: the "
                            "built-in corpus reads Python source from the interpreter's standard library); prepare "
                            "it again with `photon prepare`, from the same text and preset as the server's data and "
                            "the same Python version, or copy the server's prepared folder")
        return prepared

    def model(self, cfg: RunConfig) -> tuple[Transformer, torch.nn.Module, Tensors | None]:
        """The model on this node's device (kept warm across tasks, compiled once if asked), the module to
        call in training (the compiled one, or the model), and on the CPU its parameters laid out as one
        payload (`lay_out_parameters`)."""
        key = json.dumps([cfg.model.model_dump(mode="json"), cfg.train.device, cfg.train.compile,
                          cfg.train.activation_checkpointing, cfg.train.loss_chunk], sort_keys=True)
        if self._model is None or self._model[0] != key:
            self._model = None
            device = resolve_device(cfg.train.device)
            setup_backend(device)
            model = Transformer(cfg.model)
            flat = lay_out_parameters(model) if device.type == "cpu" else None
            release_freed_memory()  # the parameters' first home
            self._model = (key, model, place(model, cfg.train, device), flat)
        return self._model[1], self._model[2], self._model[3]

    def _lean_if_short(self, cfg: RunConfig) -> RunConfig:
        """The run's config, or the lean one (`photon node --lean`) when a client would not fit this node's
        free memory otherwise (`memory.lean_if_short`). Once a run goes lean on this node it stays lean (its
        tasks do not flip between recipes with the free memory of the moment); said once."""
        from photon.train.memory import lean_if_short

        key = cfg.model_dump_json()
        if key in self._lean_runs:
            return lean_config(cfg)
        chosen, why = lean_if_short(cfg, resolve_device(cfg.train.device).type)
        if why is not None:
            self._lean_runs.add(key)
            log.warning("%s", why)
        return chosen

    def handle(self, wire: Wire, fetch: Fetch = _in_message) -> Wire:
        """Train the client a task message names and return the reply message. `fetch` brings a payload that
        travels apart from the message (the blob side channel), into the given buffer where it fits."""
        task = decode_task(wire)
        cfg = build_config({k: v for k, v in task.config.items() if k != "tokenizer_sha256"})
        self.replies.forget_before(task.run_id, task.keep_replies_from)
        if task.resend:  # a reply the server did not get: the one kept, nothing trained again
            out = self.replies.load(task)
            if out is None:
                raise RuntimeError(f"{NOT_KEPT} task {task.task_id}'s reply is not kept on this node")
        else:
            out = corrupt_wire(task, encode_reply(self.run(task, cfg, wire, fetch)), cfg.federation.faults)
            if cfg.federation.resend_lost:
                self.replies.keep(task, out)
        if self.real_time_faults and task_timing(task, cfg.federation.faults,
                                                 cfg.data.partition.num_clients).dropped:
            raise RuntimeError(lost_reply(task.task_id, "injected fault: federation.faults.drop_probability"))
        return out

    def global_model(self, task: ClientTask, wire: Wire, layout: codec.Layout, fetch: Fetch,
                     flat: Tensors | None) -> dict[str, torch.Tensor]:
        """The task's starting model: sent whole (received straight into `flat`, the model's laid-out
        parameters, where it fits them), or rebuilt from the model this node holds and the server's compressed
        update (checked against the digest the task names, and kept for the next round)."""
        try:
            if task.base_digest is None:
                into = codec.as_laid_out(flat) if flat is not None else None
                start = codec.decode(fetch(MODEL, wire.payloads[MODEL], into), layout)
            else:
                files = self.cache.global_files(task.run_id)
                base = files.get(task.base_digest)
                if base is None:
                    raise MissingBaseModel(task.base_digest)
                if task.base_digest == task.model_digest:  # it holds the task's model already: nothing was sent
                    if wire.payloads[MODEL].nbytes:
                        raise UserError("the server sent a model update for the model this node already holds")
                    start = base
                else:
                    start = compressed_updates.reconstruct(base, fetch(MODEL, wire.payloads[MODEL], None), layout)
        except (KeyError, CodecError) as e:
            raise UserError(f"the server's model does not fit this node's model ({e}); same photon version?") from None
        if task.model_digest is not None:
            got = tensors_digest(start)
            if got != task.model_digest:
                raise RuntimeError(f"the rebuilt global model {got[:12]} is not the server's {task.model_digest[:12]}")
            files = self.cache.global_files(task.run_id)
            files.put(start, got)
            files.keep_only([got] + ([task.base_digest] if task.base_digest else []))  # nodes may share a cache
        return start

    def run(self, task: ClientTask, cfg: RunConfig, wire: Wire, fetch: Fetch = _in_message) -> ClientReply:
        maybe_fail(task, cfg.federation.faults)
        release_freed_memory()  # what the last task freed, before this one allocates its own
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        prepared = self.prepared(str(cfg.data.prep_dir), task.config.get("tokenizer_sha256"))
        stream = spans_stream(prepared, task.spans, cfg.train.seq_len, task.batch_size,
                              client_seed(cfg, task.client_id))
        procs = self.procs or cfg.federation.procs_per_node
        if self.lean:
            cfg = lean_config(cfg, procs)
        elif procs == 1:
            cfg = self._lean_if_short(cfg)
        model, trainable, flat = self.model(cfg if procs == 1 else distributed.host_config(cfg))
        layout = codec.layout_of(unique_state_dict(model))
        start: Tensors | None = self.global_model(task, wire, layout, fetch, flat)
        if flat is None:
            load_unique_state_dict(model, start)
        else:  # into the model (a no-op where it was received there), then parked on disk while it trains
            with torch.no_grad():
                for k, v in flat.items():
                    if v.data_ptr() != start[k].data_ptr():
                        v.copy_(start[k])
            if self._parked is None:
                self._parked = ParkedModel(self.cache.state_dir)
            self._parked.park(codec.as_laid_out(flat))
            start = None
        optimizer = make_optimizer(model, cfg.train)
        persist = task.client_optimizer == "persist"
        up = cfg.federation.compression.up
        state = None
        if task.state_digest is not None:
            attached = None
            if STATE in wire.payloads:
                attached = codec.decode(fetch(STATE, wire.payloads[STATE], None), client_state_layout(cfg, layout))
            state = self.cache.load(task.run_id, task.client_id, task.state_digest, attached)
            if persist:
                load_optimizer_state_tensors(model, optimizer, state, adopt=True)  # fresh from the cache file
        if procs > 1:  # N ranks train the client and leave model and optimizer as train_local would have
            spec = distributed.StreamSpec(str(prepared.path), task.spans, task.batch_size,
                                          client_seed(cfg, task.client_id))
            result = distributed.train_ranks(model, optimizer, cfg, spec, task.cursor, task.global_step,
                                             task.local_steps, task.schedule_steps, procs,
                                             self.cache.state_dir / "ranks", optimizer_state=persist)
        else:
            result = train_local(trainable, optimizer, stream, task.cursor, task.global_step, task.local_steps,
                                 cfg.train, task.schedule_steps)
        if self.real_time_faults:
            timing = task_timing(task, cfg.federation.faults, cfg.data.partition.num_clients)
            speed = timing.speed * self.slowdown
            if speed > 1:  # a slow or late site: take as long as it would have
                time.sleep(result.seconds * (speed - 1))
        # The optimizer's own tensors (no copy): it is dropped next and nothing trains them again
        new_state = ({k: v.detach().to("cpu", torch.float32)
                      for k, v in optimizer_state_tensors(model, optimizer).items()} if persist else {})
        del optimizer  # its moments are saved (persist) or done with: free them before the reply is built
        release_freed_memory()  # the activations and gradients training freed, before the update is built
        with torch.no_grad():  # parameters leave the client as CPU tensors, written where the fp32 payload is
            if flat is not None:  # θ_global − θ_local in the model's own memory, θ_global read back from disk
                self._parked.subtract(codec.as_laid_out(flat))
                update = flat
                if not self.reply_in_model:  # its own buffer: the next task overwrites the model's
                    update = codec.laid_out(layout)
                    codec.as_laid_out(update)[:] = codec.as_laid_out(flat)
            else:
                update = codec.laid_out(layout)
                for k, v in unique_state_dict(model).items():
                    torch.sub(start[k], v.detach().to("cpu", torch.float32), out=update[k])
        reply = ClientReply(task_id=task.task_id, client_id=task.client_id, round=task.round,
                            samples=result.samples, steps=result.steps, cursor=result.cursor, loss=result.loss,
                            train_seconds=result.seconds, update=update)
        corrupt_reply(task, reply, cfg.federation.faults)  # a hostile site corrupts what it would send
        if not compressed_updates.is_identity(up):
            residual = {k: v for k, v in state.items() if k.startswith(compressed_updates.EF)} if state else None
            reply.payload, new_residual = compressed_updates.client_message(
                reply.update, residual, up, seed=task.dispatch * 1_000_003 + task.client_id, round_=task.round)
            reply.update = {}
            new_state.update(new_residual or {})
        if new_state:
            reply.state_digest = self.cache.save(task.run_id, task.client_id, new_state)
            reply.state = new_state if task.upload_state else None
        return reply
