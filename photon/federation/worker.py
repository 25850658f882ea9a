"""A node's worker: trains whichever logical client a task names, with the foundation's local trainer.

It keeps the model, the memmapped data and (in `persist` mode) each client's AdamW state warm across
tasks, so a round costs local training and little else. Engine-free: the Flower ClientApp and the in-process
test transport both call `ClientWorker.run`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from photon.config import ModelConfig, build_config
from photon.data.partition import client_seed, spans_stream
from photon.data.shards import Prepared, open_prepared
from photon.errors import UserError
from photon.federation.task import ClientReply, ClientTask, Tensors
from photon.model.transformer import Transformer, load_unique_state_dict, unique_state_dict
from photon.train.local import (load_optimizer_state_tensors, make_optimizer, optimizer_state_tensors,
                                train_local)

log = logging.getLogger(__name__)


class ClientWorker:
    def __init__(self, state_dir: Path | None = None, data_dir: Path | None = None):
        """`state_dir` keeps per-client optimizer state (persist mode); `data_dir` overrides the task's prep_dir."""
        self.state_dir = Path(state_dir) if state_dir else None
        self.data_dir = data_dir
        self._prepared: dict[str, Prepared] = {}
        self._model: tuple[str, Transformer] | None = None

    def prepared(self, prep_dir: str, tokenizer_sha: str | None) -> Prepared:
        key = str(self.data_dir or prep_dir)
        if key not in self._prepared:
            self._prepared[key] = open_prepared(Path(key))
        prepared = self._prepared[key]
        if tokenizer_sha and prepared.manifest.get("tokenizer_sha256") != tokenizer_sha:
            raise UserError(f"the data at {key} was tokenized with another tokenizer than the server's; "
                            "prepare it with the same source and preset")
        return prepared

    def model(self, model_cfg: dict) -> Transformer:
        key = json.dumps(model_cfg, sort_keys=True)
        if self._model is None or self._model[0] != key:
            self._model = (key, Transformer(ModelConfig.model_validate(model_cfg)))
        return self._model[1]

    def _opt_path(self, client_id: int) -> Path | None:
        return self.state_dir / f"client_{client_id:05d}.optimizer.safetensors" if self.state_dir else None

    def run(self, task: ClientTask, params: Tensors) -> ClientReply:
        cfg = build_config({k: v for k, v in task.config.items() if k != "tokenizer_sha256"})
        faults = cfg.federation.faults
        if task.client_id in faults.fail_clients and task.round % faults.fail_every == 0:
            raise RuntimeError(f"injected fault: client {task.client_id} in round {task.round} (federation.faults)")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        prepared = self.prepared(str(cfg.data.prep_dir), task.config.get("tokenizer_sha256"))
        stream = spans_stream(prepared, task.spans, cfg.train.seq_len, cfg.train.batch_size,
                              client_seed(cfg, task.client_id))
        model = self.model(task.config["model"])
        load_unique_state_dict(model, params)
        optimizer = make_optimizer(model, cfg.train)
        opt_path = self._opt_path(task.client_id) if task.client_optimizer == "persist" else None
        if opt_path is not None and opt_path.exists():
            load_optimizer_state_tensors(model, optimizer, load_file(opt_path))
        result = train_local(model, optimizer, stream, task.cursor, task.global_step, task.local_steps,
                             cfg.train, task.schedule_steps)
        if opt_path is not None:
            opt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = opt_path.with_suffix(".tmp")
            save_file(optimizer_state_tensors(model, optimizer), tmp)
            tmp.replace(opt_path)
        out = {k: v.detach().clone() for k, v in unique_state_dict(model).items()}
        if task.client_id in faults.noise_clients:  # a broken site: noise instead of its update
            gen = torch.Generator().manual_seed(task.round * 1000 + task.client_id)
            out = {k: params[k] + faults.noise_scale * torch.randn(v.shape, generator=gen) for k, v in out.items()}
        return ClientReply(client_id=task.client_id, round=task.round, samples=result.samples,
                           steps=result.steps, cursor=result.cursor, loss=result.loss,
                           train_seconds=result.seconds, params=out)
