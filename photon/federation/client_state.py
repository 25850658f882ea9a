"""Per-logical-client state that outlives a round: kept AdamW moments (`client_optimizer: persist`), and any
other state a client carries from round to round. It belongs to the client, not to a node.

The contract:
- A state is content-addressed: its name is the SHA-256 of its tensors (`digest.tensors_digest`).
- A node caches the states it produced or received, under `<state_dir>/<run uid>/client_<id>/<digest>`, so a
  new run never loads an old run's state. It writes a new state *beside* the old one: nothing it writes is
  used until the server commits the round and names that digest in the client's next task.
- The server's client table holds the committed digest (and the node that holds it); it is in every
  checkpoint, so a resumed run names exactly the states it committed.
- With `federation.state_backup` (default) every new state is also uploaded and kept by the server in a
  content-addressed store under the run directory; a node that lacks the named state (another node trained
  the client last, a restarted node, a server resumed from an older checkpoint) gets it attached to a retry.
  Without a backup the client starts from a fresh state, and the server says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from photon.config import RunConfig
from photon.digest import tensors_digest
from photon.federation import codec, compressed_updates

Tensors = dict[str, torch.Tensor]
MISSING = "photon:missing-client-state"  # marks a node's error reply: "I do not hold the state you named"
MISSING_BASE = "photon:missing-base-model"  # "I do not hold the model your compressed update applies to"


class MissingClientState(RuntimeError):
    def __init__(self, client: int, digest: str):
        super().__init__(f"{MISSING} client {client} state {digest[:12]} is not cached on this node")


class MissingBaseModel(RuntimeError):
    def __init__(self, digest: str):
        super().__init__(f"{MISSING_BASE} the global model {digest[:12]} is not cached on this node")


class StateFiles:
    """A folder of content-addressed safetensors files; writes are atomic, reads verify the digest."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if not digest.isalnum():  # a digest names a file: never let it name a path
            raise ValueError(f"bad state digest {digest!r}")
        return self.root / f"{digest}.safetensors"

    def put(self, tensors: Tensors, digest: str | None = None) -> str:
        digest = digest or tensors_digest(tensors)
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> Tensors | None:
        """The state named `digest`, or None if absent or damaged (a damaged file is deleted)."""
        path = self.path(digest)
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a torn or foreign file: treat as absent
            path.unlink(missing_ok=True)
            return None
        if tensors_digest(tensors) != digest:
            path.unlink(missing_ok=True)
            return None
        return tensors

    def keep_only(self, digests: Iterable[str]) -> None:
        """Delete every state not in `digests` (and leftover temporaries)."""
        keep = {f"{d}.safetensors" for d in digests}
        if not self.root.is_dir():
            return
        for f in self.root.iterdir():
            if f.is_file() and f.name not in keep:
                f.unlink(missing_ok=True)


class NodeStateCache:
    """A node's cache of client states, per run and client."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)

    def run_dir(self, run_id: str) -> Path:
        """This node's folder for a run (the run's uid names it; anything else is refused)."""
        if not run_id.isalnum():
            raise ValueError(f"bad run id {run_id!r}")
        return self.state_dir / run_id

    def files(self, run_id: str, client: int) -> StateFiles:
        return StateFiles(self.run_dir(run_id) / f"client_{client:06d}")

    def load(self, run_id: str, client: int, digest: str, attached: Tensors | None) -> Tensors:
        """The committed state `digest`: from the cache, else from `attached` (checked and cached), else
        `MissingClientState`. Older states of the client are dropped: the server committed this one. The
        tensors are always fresh from the cache file (writable, shared with nothing): the caller may train
        them in place."""
        files = self.files(run_id, client)
        state = files.get(digest)
        if state is None and attached is not None:
            if tensors_digest(attached) != digest:
                raise ValueError(f"the attached state of client {client} does not match its digest")
            files.put(attached, digest)
            state = files.get(digest)
        if state is None:
            raise MissingClientState(client, digest)
        files.keep_only([digest])
        return state

    def save(self, run_id: str, client: int, state: Tensors) -> str:
        return self.files(run_id, client).put(state)

    def global_files(self, run_id: str) -> StateFiles:
        """The last global model this node received (for compressed down-link updates), per run."""
        return StateFiles(self.run_dir(run_id) / "global")


def client_state_layout(cfg: RunConfig, layout: codec.Layout) -> codec.Layout:
    """The names and shapes of a client's kept state: AdamW moments (persist), error-feedback residuals."""
    out = []
    if cfg.federation.client_optimizer == "persist":
        out += optimizer_state_layout(layout, muon=cfg.train.optimizer == "muon")
    if cfg.federation.compression.up.error_feedback:
        out += compressed_updates.residual_layout(layout)
    return sorted(out)


def optimizer_state_layout(layout: codec.Layout, muon: bool = False) -> codec.Layout:
    """The names and shapes of a client's kept optimizer state for a model of this layout: AdamW's moments and
    step, or (`muon`) Muon's momentum for the blocks' hidden matrices."""
    from photon.train.muon import is_muon_param

    out = []
    for name, shape in layout:
        if muon and is_muon_param(name, shape):
            out.append((f"{name}.momentum_buffer", tuple(shape)))
        else:
            out += [(f"{name}.exp_avg", tuple(shape)), (f"{name}.exp_avg_sq", tuple(shape)), (f"{name}.step", ())]
    return sorted(out)
