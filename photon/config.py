"""One typed configuration for every Photon run: model shape, data, local training, federation.

A run is a YAML preset (``photon/presets/<name>.yaml``) plus ``key.path=value`` overrides. Everything is
validated here, once, at the edge: unknown keys, wrong types and out-of-range values are refused with a
message that names the key and the fix. Nothing below this module reads environment variables or YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from photon.errors import UserError

MIN_VOCAB = 257  # 256 byte symbols + EOT: byte-level BPE cannot go smaller

PRESET_DIR = Path(__file__).parent / "presets"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # an infinite LR is a typo


class ModelConfig(_Frozen):
    """Shape of the decoder-only (Llama-style) transformer."""

    vocab_size: int = Field(8192, ge=MIN_VOCAB, description="Tokenizer vocabulary size (embedding rows); at least "
                            f"{MIN_VOCAB}: a byte-level BPE's 256 byte symbols and its end-of-text token.")
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    d_model: int = Field(128, ge=8, description="Hidden width.")
    n_head: int = Field(4, ge=1, description="Attention heads.")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads (grouped-query); None = n_head.")
    ffn_hidden: int | None = Field(None, ge=8, description="SwiGLU hidden width; None = 8/3·d_model rounded up to 64.")
    max_seq_len: int = Field(256, ge=8, description="Longest context the model is configured for.")
    tie_embeddings: bool = Field(True, description="Share input embedding and output head weights.")
    rope_theta: float = Field(10000.0, gt=0, description="Rotary embedding base.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of linear and embedding weights.")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("model.d_model / model.n_head must be even (rotary embeddings rotate pairs)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(8 * self.d_model / 3) // 64) * 64


class PartitionConfig(_Frozen):
    """How the prepared training tokens are split into logical clients (data partitions)."""

    kind: Literal["iid", "by-domain", "dirichlet"] = Field(
        "by-domain", description="iid: every client gets an equal slice of every domain; by-domain: each client "
        "holds whole domains; dirichlet: domain mixture per client drawn from Dir(alpha).")
    num_clients: int = Field(4, ge=1, description="N, the number of logical clients (partitions).")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (kind=dirichlet only); small = skewed.")
    seed: int = Field(0, description="Seed for the partition draw.")


class DataConfig(_Frozen):
    """Where prepared data lives and how raw text becomes token shards."""

    @field_validator("prep_dir", mode="before")
    @classmethod
    def _path_from_number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    prep_dir: Path = Field(Path("data/prepared"), description="Prepared corpus: tokenizer, shards, manifest.")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of each domain's documents held out.")
    max_mb_per_domain: float | None = Field(
        None, gt=0, description="Cap on raw text per domain (MB), for quick runs; None = all of it.")
    tokenizer_sample_mb: float = Field(20.0, gt=0, description="Raw text (MB) sampled to train the BPE tokenizer.")
    seed: int = Field(0, description="Seed for document shuffling and the train/val split.")
    partition: PartitionConfig = PartitionConfig()


class TrainConfig(_Frozen):
    """The local (inner) optimizer and its schedule; also the centralized baseline's."""

    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step (per client).")
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate of the cosine schedule.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (paper: 0.1).")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup, in global steps.")
    steps: int = Field(2000, ge=1, description="Schedule length in global steps (centralized run length).")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="The inner optimizer: adamw (the paper's), or muon (MuLoCo: torch.optim.Muon on the "
        "transformer blocks' hidden matrices, its LR matched to AdamW's update RMS, AdamW on the rest; one process "
        "per client).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (paper: 0); Muon's too.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay β1 (the paper's 0.9).")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's second-moment decay β2 (the paper's 0.95).")
    eps: float = Field(1e-8, gt=0, description="AdamW's ε (the paper's 1e-8).")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    bf16: bool = Field(False, description="bf16 autocast for forward/backward (weights stay fp32).")
    compile: bool = Field(False, description="torch.compile the model (slow first steps, faster after; the "
                          "compiled model is kept warm across rounds on a node).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: auto = cuda when available, else cpu.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward/backward; batch_size is reached by gradient accumulation "
        "(None = the whole batch at once). Same result as one full batch, within fp32 rounding.")
    sharding: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How a multi-process client shares the model: ddp (a replica per process), fsdp "
        "(FSDP2 fully_shard: parameters, gradients and optimizer state sharded); auto = fsdp when a replica with "
        "its AdamW state would not fit one device, else ddp.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward instead of storing them.")
    step_in_backward: bool = Field(
        False, description="AdamW steps each parameter as soon as its gradient is complete, and frees that "
        "gradient, so the gradients never all exist at once (one model's worth less memory at the peak). With "
        "grad_clip > 0 the global norm must be known first: each step then runs backward twice through one "
        "forward (a norm pass, then the step pass), the same result for one more backward. One process per "
        "client, no micro-batches, no compile.")
    loss_chunk: int | None = Field(
        None, ge=1, description="Tokens per chunk of the output layer + cross-entropy, recomputed in backward, so "
        "full fp32 logits never exist at once (None = auto: 4096 when the vocabulary is >= 32k, else off).")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = torch's default.")
    seed: int = Field(0, description="Seed for parameter init and data order.")
    eval_every: int = Field(200, ge=1, description="Evaluate every this many steps (centralized).")
    eval_batches: int = Field(8, ge=1, description="Validation batches per domain at each evaluation.")
    ckpt_every: int = Field(200, ge=1, description="Checkpoint every this many steps (centralized).")
    keep_checkpoints: int = Field(3, ge=2, description="Checkpoints kept (the newest; centralized; at least 2, so "
                                  "a damaged newest one has a fallback). Raise it to compare models along the run.")
    eval_tasks: list[str] = Field(
        [], description="lm-evaluation-harness tasks to run on the model, centralized or federated (the global "
        "model, in the server process): registry names (e.g. arc_easy; data from the Hugging Face hub), task "
        "YAML files or folders of them; a list or a comma-separated string. Run at every eval_tasks_every-th "
        "evaluation and the last, logged as `tasks` rows (metrics.jsonl, TensorBoard). Needs pip install -e "
        "'.[eval]'.")
    eval_tasks_every: int = Field(1, ge=1, description="Run train.eval_tasks at every this many evaluations.")
    eval_tasks_limit: int | None = Field(None, ge=1, description="At most this many examples per task "
                                         "(None = all).")

    @field_validator("eval_tasks", mode="before")
    @classmethod
    def _split_tasks(cls, v: Any) -> Any:
        return comma_list(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_micro_batch(self) -> TrainConfig:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.batch_size={self.batch_size} is not a multiple of train.micro_batch_size="
                             f"{self.micro_batch_size}")
        if self.step_in_backward and (self.micro_batch_size or self.batch_size) < self.batch_size:
            raise ValueError(f"train.step_in_backward steps each parameter as its gradient completes, so it cannot "
                             f"add up micro-batches (train.micro_batch_size={self.micro_batch_size}): unset one "
                             f"of the two")
        if self.step_in_backward and self.compile:
            raise ValueError("train.step_in_backward needs an eager model: a compiled backward hands back all of "
                             "its gradients at once (no memory saved) and cannot run twice for the clipping norm; "
                             "unset train.compile or train.step_in_backward")
        return self


class OuterConfig(_Frozen):
    """The server (outer) optimizer applied to the pseudo-gradient Δ = θ − mean(θ_k)."""

    name: Literal["fedavg", "nesterov", "delayed-nesterov", "fedmom", "fedadam", "fedyogi"] = Field(
        "fedavg", description="fedavg is Photon's recipe (lr 1.0); nesterov is DiLoCo's (lr 0.7, momentum 0.9); "
        "delayed-nesterov updates the momentum every `delay` steps (Async Local-SGD's DN, for async rounds).")
    lr: float = Field(1.0, gt=0, description="Server learning rate η.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (nesterov, delayed-nesterov, fedmom).")
    delay: int = Field(4, ge=1, description="delayed-nesterov: outer steps N between momentum updates (each step "
                       "moves θ by −lr·Δ/N; 1 is nesterov).")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="The outer LR over the run: constant (the field's usual choice), or a cosine from "
        "lr at the first outer step to lr × min_lr_ratio at the last (federation.schedule_rounds, else rounds).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: the last outer step's LR as a fraction of lr.")
    beta1: float = Field(0.9, ge=0, lt=1, description="First-moment decay (fedadam, fedyogi).")
    beta2: float = Field(0.99, ge=0, lt=1, description="Second-moment decay (fedadam, fedyogi).")
    tau: float = Field(1e-3, gt=0, description="Adaptivity floor τ (fedadam, fedyogi).")


ReplyFault = Literal["flip", "nan", "lie", "wrong-round", "wrong-client", "truncate", "oversize", "bad-header",
                     "bad-layout", "wrong-dtype", "no-payload"]


class FaultConfig(_Frozen):
    """Deliberate faults, for testing that a deployment survives them (chaos testing). Off by default."""

    fail_clients: list[int] = Field([], description="Clients whose training raises an error ...")
    fail_every: int = Field(2, ge=1, description="... in every round r with r % fail_every == 0.")
    noise_clients: list[int] = Field([], description="Clients that reply with θ + N(0, noise_scale²) every round "
                                     "(a broken or Byzantine site).")
    noise_scale: float = Field(1.0, gt=0, description="Std of the noise sent by noise_clients.")
    reply: dict[int, ReplyFault] = Field(
        {}, description="Client -> a hostile or broken reply it sends every round: flip (its update reversed and "
        "scaled by flip_scale), nan, lie (header claims 10^6 x the samples and 1000 x the steps), wrong-round, "
        "wrong-client, truncate / oversize (payload bytes cut or padded), bad-header (not JSON), bad-layout "
        "(a layout that does not match the model), wrong-dtype, no-payload.")
    flip_scale: float = Field(5.0, gt=0, description="Scale of the reversed update sent by `reply: flip` clients.")
    slow_fraction: float = Field(0.0, ge=0, le=1, description="Share of the clients that train slow_factor× "
                                 "slower (chosen with faults.seed): heterogeneous sites.")
    slow_factor: float = Field(3.0, ge=1, description="How much slower the slow clients are.")
    drop_probability: float = Field(0.0, ge=0, lt=1, description="Chance that a task's reply is lost (seeded per "
                                    "task). In-process: the reply never arrives; on Flower: an error reply after "
                                    "the work, since Flower cannot lose a message.")
    late_probability: float = Field(0.0, ge=0, le=1, description="Chance that a task runs late_factor× slower "
                                    "(seeded per task): a busy cluster, a node that restarts.")
    late_factor: float = Field(3.0, ge=1, description="How much slower a late task is.")
    seed: int = Field(0, description="Seed of the slow clients and nodes and of the drop/late draws.")
    slow_node_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of the nodes that train slow_factor× slower (chosen with faults.seed): a "
        "slow machine, whichever client it trains, so scheduling can work around it. Modelled by the virtual clock "
        "(a deployed node drills it with `photon node --slowdown`).")
    drop_trace: Literal["task", "link"] = Field(
        "task", description="How lost replies are drawn. task: per (client, dispatch), as every engine can; link "
        "(virtual clock): per (node, the instant the reply arrives), drawn once per node from faults.seed, so "
        "arms that dispatch differently face the same lossy links.")
    outage: dict[int, tuple[float, float]] = Field(
        {}, description="Node -> [from, to] virtual seconds in which it is down (virtual clock): a task it holds "
        "then dies (its error reaches the server when the node dies), it takes no task until `to`, then returns.")
    kill_rank: int | None = Field(None, ge=0, description="In a multi-process client, this rank kills itself "
                                  "(SIGKILL) halfway through every task: a crashed GPU process.")

    @field_validator("outage")
    @classmethod
    def _outage_windows(cls, v: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
        for node, (start, end) in v.items():
            if node < 0 or not 0 <= start < end:
                raise ValueError(f"outage of node {node}: needs a node >= 0 and 0 <= from < to, got [{start}, {end}]")
        return v


class AdaptiveDeadlineConfig(_Frozen):
    """A task deadline that follows the clients' recent pace: median + k·MAD of recent task times, floored."""

    k_mad: float = Field(3.0, ge=0, description="How many median absolute deviations above the median.")
    floor_s: float = Field(1.0, gt=0, description="Never shorter than this (seconds).")
    window: int = Field(32, ge=3, description="Recent task times the median is taken over.")
    margin: float = Field(1.2, ge=1, description="The deadline is at least this multiple of the median.")


class AsyncConfig(_Frozen):
    """Asynchronous rounds (federation.mode=async): nodes never wait for each other; the server takes an outer
    step whenever a quorum of replies is in, weighting each by how stale it is."""

    quorum: int | None = Field(None, ge=1, description="M: replies per outer step (None = clients_per_round).")
    grace_s: float | None = Field(None, gt=0, description="Step with fewer (but >= min_replies) replies once the "
                                  "oldest waiting reply has waited this long (seconds); None = only on quorum.")
    max_staleness: int = Field(4, ge=0, description="Refuse a reply computed from a model more than this many "
                               "outer steps old.")
    staleness: Literal["constant", "polynomial"] = Field(
        "polynomial", description="Weight of a reply s steps stale: constant (1) or polynomial 1/(1+s)^a.")
    exponent: float = Field(0.5, ge=0, description="a of the polynomial staleness weight.")
    weighting: Literal["normalized", "summed"] = Field(
        "summed", description="How the staleness weights s enter Δ: summed as FedBuff does, Σ n·s·Δ / Σ n (n: "
        "samples; a step made of stale replies is damped by their mean weight), or normalized, Σ n·s·Δ / Σ n·s "
        "(a step made only of stale replies is as large as a fresh one, which at the default outer LR "
        "over-steps).")
    concurrency: int | None = Field(None, ge=1, description="Clients in flight at once (None = one per node).")
    dynamic_local_steps: bool = Field(
        True, description="Give each node's task H × (the fastest node's seconds per step / its own), at least "
        "1, measured from each node's last task, as Async Local-SGD's dynamic local updates do: a slow machine "
        "returns about when a fast one does, so its update is fresh and weighs by the steps it took.")
    fold_arrived_together: bool = Field(
        True, description="Fold every reply handed over together with the one that completes the quorum (one "
        "pull of Flower's, one instant of the virtual clock), not just the quorum: replies that arrive together "
        "are as fresh as each other, and the surplus, left for the next step, would be a step staler.")


class VirtualClockConfig(_Frozen):
    """How the in-process engine times tasks: it runs them for real but orders their completions by a virtual
    clock, so timing (and asynchronous runs) are deterministic and nothing waits."""

    step_seconds: float = Field(1.0, gt=0, description="Virtual seconds of one local step at speed 1.")
    bandwidth_mbps: float = Field(1000.0, gt=0, description="Virtual link speed for moving messages.")


class CodecConfig(_Frozen):
    """How updates travel one way (federation/codec.py has the byte layouts)."""

    codec: Literal["fp32", "bf16", "fp16", "int8", "int4", "2bit", "topk", "replies"] = Field(
        "fp32", description="fp32 (exact), bf16/fp16 casts, int8/int4 with per-block scales, 2bit (codebook or "
        "sign per block), topk (a density of each chunk, values in `values`); down only: replies (the round's "
        "accepted up-link messages, from which every node rebuilds the new model as the server does).")
    density: float = Field(0.02, gt=0, le=1, description="topk: fraction of each chunk kept.")
    values: Literal["fp32", "bf16", "fp16", "int8", "int4", "2bit"] = Field(
        "fp32", description="topk: codec of the kept values.")
    chunk: int = Field(4096, ge=1, le=65536, description="topk: elements per chunk (SparseLoCo's 64x64 tiles: "
                       "4096); indices travel Elias-Fano coded, 8 bits each at 1/64.")
    # the bounds are the codec's own (federation/codec.py: MAX_CHUNK, MAX_BLOCK; a test keeps them equal)
    block_size: int = Field(256, ge=1, le=1 << 20, description="int8/int4/2bit: elements sharing one scale.")
    stochastic: bool = Field(False, description="Unbiased stochastic rounding (seeded per task) instead of "
                             "nearest.")
    two_bit: Literal["sign", "codebook"] = Field(
        "codebook", description="2bit: four levels per block, each the mean of its values (codebook: two bits of "
        "information), or ±scale and 0 (sign: three levels).")
    error_feedback: bool = Field(False, description="Carry what compression left out into the next round's "
                                 "message (up: per client, kept with the client's state; down: on the server).")
    error_feedback_decay: float = Field(
        0.95, ge=0, le=1, description="β: each round the residual is multiplied by β before the new update is "
        "added (SparseLoCo's 0.95); 1 is classic error feedback, which re-adds every residual in full.")
    error_feedback_warmup_rounds: int = Field(
        0, ge=0, description="Up: the first rounds send C(Δ) and keep no residual (SparseLoCo zeroes its buffer "
        "in warm-up rounds).")


class CenteredClipConfig(_Frozen):
    """Centered clipping (`aggregation: centered-clip`): each update's pull on the aggregate is capped at the
    radius, so one update moves it by at most radius × its weight share, while no update is rejected."""

    centre: Literal["median", "previous"] = Field(
        "median", description="Where clipping starts: the coordinate-wise median of the round's updates, or the "
        "previous round's aggregate (kept in the checkpoint; zero in the first round).")
    radius: float | Literal["median"] = Field(
        "median", description="A fixed L2 radius, or 'median': radius_factor × the median distance of the updates "
        "to the centre, each iteration.")
    radius_factor: float = Field(
        1.5, gt=0, description="Multiple of the median distance (radius: median). 1.5 leaves honest by-domain "
        "updates whole in clean runs; 1 bounds attackers tighter but also clips honest ones (docs/RESULTS.md).")
    iterations: int = Field(1, ge=1, le=10, description="Clipping iterations (each re-reads the parked updates).")
    bucket_size: int = Field(1, ge=1, description="Average seeded random buckets of this many updates before "
                             "clipping (1: no buckets).")

    @field_validator("radius")
    @classmethod
    def _positive_radius(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:  # an infinite one is refused before this (allow_inf_nan=False)
            raise ValueError("radius must be a positive number or 'median'")
        return v


class CompressionConfig(_Frozen):
    """Compressed updates: clients send C(Δ_k + e_k) up; the server sends the outer update (or the round's
    replies) down."""

    recipe: Literal["custom", "sparseloco"] = Field(
        "custom", description="A named recipe, expanded when given as an override (later overrides win): "
        "sparseloco = top-k 1/64 of each 4096-element chunk with Elias-Fano indices (8 bits each), 2-bit "
        "codebook values, error feedback β 0.95, the contributor mean, the replies as the down-link, outer SGD "
        "(FedAvg) lr 1. custom: the fields as set.")
    up: CodecConfig = CodecConfig()
    down: CodecConfig = CodecConfig()

    @model_validator(mode="after")
    def _replies_only_down(self) -> CompressionConfig:
        if self.up.codec == "replies":
            raise ValueError("federation.compression.up.codec=replies: replies is a down-link codec (the round's "
                             "up-link messages forwarded); pick an up-link codec such as topk")
        if self.down.codec == "replies" and self.down.error_feedback:
            raise ValueError("federation.compression.down.codec=replies forwards the replies exactly: it leaves "
                             "nothing out, so set down.error_feedback=false")
        return self


# The named recipes: `federation.compression.recipe=NAME` given as an override expands, in its place, into these
# overrides (so a later override still changes any of them); the recipe's name stays in the config.
RECIPES: dict[str, tuple[str, ...]] = {
    # SparseLoCo (arXiv 2508.15706; Templar's hparams: topk 64 of 64x64 tiles, 4 bins, momentum_decay 0.95,
    # outer SGD lr 1.0): sparse 2-bit messages up, each node rebuilds the model from all of them.
    "sparseloco": ("federation.compression.up.codec=topk", "federation.compression.up.density=0.015625",
                   "federation.compression.up.chunk=4096", "federation.compression.up.values=2bit",
                   "federation.compression.up.two_bit=codebook", "federation.compression.up.error_feedback=true",
                   "federation.compression.up.error_feedback_decay=0.95", "federation.compression.down.codec=replies",
                   "federation.compression.down.error_feedback=false", "federation.aggregation=contributor-mean",
                   "federation.outer.name=fedavg", "federation.outer.lr=1.0", "federation.min_cosine=null"),
    "custom": (),
}


class FederationConfig(_Frozen):
    """Rounds, sampling and fault tolerance of the federated run."""

    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: rounds of K clients (Photon); async: nodes never wait, the server steps on a "
        "quorum of replies weighted by staleness (see federation.asynchronous).")
    rounds: int = Field(8, ge=1, description="Number of federated rounds (async: outer steps).")
    clients_per_round: int = Field(4, ge=1, description="K, clients sampled each round (may exceed the nodes).")
    local_steps: int = Field(16, ge=1, description="H, local optimizer steps per client per round.")
    outer: OuterConfig = OuterConfig()
    client_optimizer: Literal["reset", "persist"] = Field(
        "persist", description="persist (the paper's scripts, reset_optimizer=false): each client's AdamW state is "
        "kept across rounds, cached on the nodes and committed with the round; reset: a fresh AdamW every round "
        "(truly stateless clients).")
    state_backup: bool = Field(
        True, description="Upload each client's kept state (persisted AdamW moments) to the server every "
        "state_backup_every rounds of that client, so it survives the loss of the node that holds it and "
        "follows the client to any node. Costs the state's size in up-link bytes (counted apart as "
        "bytes_state_up). false: state lives only in node caches; a client trained by a node without it starts "
        "from a fresh state (logged).")
    state_backup_every: int = Field(
        10, ge=1, description="Back a client's kept state up after every this many of its rounds. The state is "
        "twice the model (AdamW's two moments), so every round it would send 2× the update's bytes; every 10th "
        "sends 0.2×. The node that trained a client keeps its exact state and is given that client first, so "
        "the backup is only used when a client moves (its node is busy, failed or gone); it then continues from "
        "its last backup, up to this many rounds old (logged). 1: exact wherever a client goes.")
    min_replies: int = Field(1, ge=1, description="A round needs at least this many good replies, else it is retried.")
    resend_lost: int = Field(
        2, ge=0, description="Nodes keep every reply they send (on disk, until the server can no longer need "
        "it); a reply lost on the way is asked for again this many times before its client is trained again "
        "elsewhere. 0: nothing is kept (a model-sized write per reply saved) and a lost reply is trained again.")
    max_round_retries: int = Field(3, ge=0, description="Retries of a round that got too few replies.")
    round_timeout_s: float = Field(3600.0, gt=0, description="Fixed deadline: a round's replies later than this "
                                   "(seconds from the round's start) are dropped. Also the cap of the adaptive one.")
    deadline: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: round_timeout_s per round; adaptive: each task gets the median of recent "
        "task times plus k·MAD (federation.adaptive), so a straggler is dropped instead of waited for.")
    adaptive: AdaptiveDeadlineConfig = AdaptiveDeadlineConfig()
    asynchronous: AsyncConfig = AsyncConfig()
    virtual_clock: VirtualClockConfig = VirtualClockConfig()
    compression: CompressionConfig = CompressionConfig()
    schedule_rounds: int | None = Field(
        None, ge=1, description="Rounds the LR schedule spans (None = federation.rounds). Set it to the original "
        "rounds when extending a run with more rounds: the extra rounds train on the LR floor.")
    node_max_failures: int = Field(
        3, ge=1, description="Exclude a node after this many tasks in a row that it could not run (error "
        "replies), for at least two different clients: a node without data fails every client, while a bad "
        "client fails everywhere. Rejected replies count against the client, lost ones against nobody; the "
        "last usable node is never excluded; an excluded node is tried again after 1, 2, 4, ... 16 rounds.")
    eval_every: int = Field(1, ge=1, description="Evaluate the global model every this many rounds.")
    keep_checkpoints: int = Field(3, ge=2, description="Round checkpoints kept (the newest; at least 2, so a "
                                  "damaged newest one has a fallback; in async mode at "
                                  "least max_staleness + 2, which in-flight tasks may still need). Raise it to "
                                  "compare models along the run.")
    num_nodes: int = Field(2, ge=1, description="Simulated nodes (Flower SuperNodes) in simulation.")
    procs_per_node: int = Field(
        1, ge=1, description="Processes (GPUs, or CPU processes) that train one client together on a node, with "
        "torch.distributed; the client's batch is split across them, so its recipe does not change. A deployed "
        "node sets it with `photon node --procs N`.")
    aggregation: Literal["mean", "trimmed-mean", "median", "centered-clip", "contributor-mean"] = Field(
        "centered-clip", description="centered-clip (default): each update's pull on the aggregate is capped "
        "(federation.clipping, Karimireddy et al. 2021), none rejected, so honest clients whose data differ keep "
        "their say while a hostile one's is bounded; mean: streaming weighted mean (the paper's FedAvg); "
        "trimmed-mean / median: coordinate-wise, robust to a minority of bad updates; contributor-mean "
        "(SparseLoCo's, for sparse replies): each update's tensors clipped to the round's median norm, each "
        "coordinate averaged over the updates that sent it.")
    clipping: CenteredClipConfig = CenteredClipConfig()
    trim_fraction: float = Field(0.25, ge=0, lt=0.5, description="Share trimmed from each end (trimmed-mean).")
    clip_update_norm: float | None = Field(None, gt=0, description="Clip each update θ_k − θ to this L2 norm.")
    max_norm_ratio: float | None = Field(
        100.0, gt=1, description="Reject an update whose norm exceeds this multiple of the median update norm of "
        "the round's replies (of the previous round when fewer than 3 replied): an absurd norm, not a "
        "heterogeneous one; None disables the check.")
    min_cosine: float | None = Field(
        None, ge=-1, lt=1, description="Off by default. Reject an update whose cosine with fewer than half of the "
        "round's other updates is at least this (pairwise cosines, decided once the round's replies are in; "
        "needs at least 3 replies); 0 rejects updates pointing away from the majority. It also turns away honest "
        "clients whose domains have drifted apart (RELIABILITY.md), which centered clipping does not.")
    faults: FaultConfig = FaultConfig()


class RunConfig(_Frozen):
    """A whole run: a preset plus overrides."""

    name: str = Field("tiny", description="Preset name, for logs and default run folder names "
                      "(runs/<name>-federated).")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v: str) -> str:
        if not v.strip() or v in (".", "..") or "/" in v or "\\" in v:
            raise ValueError(f"{v!r} is used in folder names (runs/<name>-federated): give a name without '/'")
        return v

    @model_validator(mode="after")
    def _check_cross(self) -> RunConfig:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        fed, n = self.federation, self.data.partition.num_clients
        if self.train.step_in_backward and fed.procs_per_node > 1:
            raise ValueError(f"train.step_in_backward trains a client in one process, not "
                             f"federation.procs_per_node={fed.procs_per_node} (their gradients are averaged "
                             f"over the processes first): unset one of the two")
        if self.train.optimizer == "muon" and (fed.procs_per_node > 1 or self.train.step_in_backward):
            raise ValueError("train.optimizer=muon trains a client in one process and steps after backward: unset "
                             "federation.procs_per_node / train.step_in_backward, or use adamw")
        if fed.clients_per_round > n:
            raise ValueError(f"federation.clients_per_round={fed.clients_per_round} exceeds "
                             f"data.partition.num_clients={n}: sample at most N clients per round")
        if fed.min_replies > fed.clients_per_round:
            raise ValueError(f"federation.min_replies={fed.min_replies} exceeds "
                             f"federation.clients_per_round={fed.clients_per_round}")
        if fed.mode == "async" and (fed.asynchronous.quorum or fed.clients_per_round) < fed.min_replies:
            raise ValueError(f"federation.asynchronous.quorum={fed.asynchronous.quorum} is below "
                             f"federation.min_replies={fed.min_replies}")
        for client in [*fed.faults.reply, *fed.faults.fail_clients, *fed.faults.noise_clients]:
            if not 0 <= client < n:
                raise ValueError(f"federation.faults names client {client}, but clients are 0..{n - 1}")
        if fed.compression.down.codec == "replies":
            need = [(f"federation.aggregation={fed.aggregation}", fed.aggregation == "contributor-mean",
                     "contributor-mean"), (f"federation.outer.name={fed.outer.name}", fed.outer.name == "fedavg",
                                           "fedavg (outer SGD)"), (f"federation.mode={fed.mode}",
                                                                   fed.mode == "sync", "sync")]
            for have, ok, want in need:
                if not ok:
                    raise ValueError(f"federation.compression.down.codec=replies rebuilds the model on every node "
                                     f"from the replies, which needs {want}, not {have}")
        return self

    @property
    def federated_steps(self) -> int:
        """Length of the global schedule in a federated run: (schedule_rounds or rounds) × H sequential steps."""
        return (self.federation.schedule_rounds or self.federation.rounds) * self.federation.local_steps

    def check_federated_schedule(self) -> None:
        """The warmup fits the federated schedule (checked where a federated run starts, not for every config:
        a centralized run's schedule is train.steps)."""
        if self.train.warmup_steps > self.federated_steps:
            raise UserError(f"train.warmup_steps={self.train.warmup_steps} exceeds the federated schedule of "
                            f"{self.federated_steps} global steps (federation.rounds × federation.local_steps); "
                            "lower the warmup or train for more rounds")

    def check_central_schedule(self) -> None:
        if self.train.warmup_steps > self.train.steps:
            raise UserError(f"train.warmup_steps={self.train.warmup_steps} exceeds train.steps={self.train.steps}; "
                            "lower the warmup or train for more steps")


# ---------------------------------------------------------------------------------------------------------
# Loading: preset + overrides -> RunConfig


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 -- a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8); pass a YAML config file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def comma_list(text: str) -> list[str]:
    """The names in a comma-separated option ("a, b,,c" -> ["a", "b", "c"])."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=3e-4'`` -> ``('train.lr', '3e-4')``: the value is read as YAML (numbers, bools, lists, null);
    pydantic then converts it to the field's type. A value with `#` is taken verbatim (not a YAML comment). A
    path or text field keeps the text as typed (a folder named `010` or `no` is that folder, not the number 8
    or False), but without YAML's quotes; an empty one is None."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise UserError(f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. train.lr=3e-4")
    if "#" in raw:
        return key, raw.strip()
    if _is_text_field(key):  # YAML's quotes are honoured ("my run" is my run); its numbers, dates, bools are not
        try:
            quoted = yaml.safe_load(raw)
        except yaml.YAMLError:
            quoted = None
        return key, quoted if isinstance(quoted, str) else (raw.strip() or None)
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return key, raw.strip()


def _section(path: tuple | list) -> type[BaseModel] | None:
    """The config section (a model class) that the keys `path` lead to from the top; None if they lead
    elsewhere (a value, or no field)."""
    model: Any = RunConfig
    for part in path:
        model = getattr(model.model_fields.get(part), "annotation", None)
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            return None
    return model


def _is_text_field(key: str) -> bool:
    """Whether the config field at dotted `key` holds a path or a string (and nothing else)."""
    *sections, name = key.split(".")
    section = _section(sections)
    field = section.model_fields.get(name) if section is not None else None
    return field is not None and field.annotation in (str, Path)


def _fields_at(loc: tuple) -> list[str]:
    """The valid keys of the config section that `loc` (a pydantic error location) points into."""
    section = _section(loc[:-1])
    return sorted(section.model_fields) if section is not None else []


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (valid here: {', '.join(_fields_at(err['loc']))}; `photon presets` lists presets)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def build_config(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(f"bad config: {_format_validation(e)}") from None


def load_config(preset: str | Path = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """Load a preset by name (or a YAML file path) and apply ``key=value`` overrides."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists():
            raise UserError(f"unknown preset {str(preset)!r}; choose one of: {', '.join(preset_names())} "
                            "or pass a YAML file path")
    elif not path.exists():
        raise UserError(f"config file {path} does not exist")
    tree = _read_yaml(path)
    tree.setdefault("name", path.stem)
    if not isinstance(tree["name"], str):
        tree["name"] = str(tree["name"])
    return apply_overrides(tree, overrides)


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> RunConfig:
    """A config tree (a preset, or a run's saved config.json) with `key=value` overrides, validated."""
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
        if key == "federation.compression.recipe":
            if value not in RECIPES:
                raise UserError(f"{text}: unknown recipe; choose one of {', '.join(sorted(RECIPES))}")
            for item in RECIPES[value]:
                _set_path(tree, *parse_override(item))
    return build_config(tree)


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of `cfg` with `key=value` overrides applied and validated."""
    return apply_overrides(config_to_dict(cfg), list(overrides))


def with_absolute_prep_dir(cfg: RunConfig) -> RunConfig:
    """`cfg` with data.prep_dir made absolute, so the run's config.json names its data from any folder (a
    relative one would be read from wherever `--resume` or `photon eval` is run next)."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"prep_dir": Path(cfg.data.prep_dir).absolute()})})


def load_saved_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run directory was started with (its config.json), plus overrides."""
    import json

    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise UserError(f"{run_dir} has no config.json: not a photon run directory")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged (not a JSON object of config keys); restore it, or start a new run "
                        "with the same --preset and --set")
    return apply_overrides(saved, overrides)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


# What a config stored before these fields existed meant, where the field's default has changed since: the
# behaviour the code had then. Async rounds used to run every task with H steps and to leave replies handed over
# with the quorum for the next step.
BEFORE_FIELD = {"federation.asynchronous.dynamic_local_steps": False,
                "federation.asynchronous.fold_arrived_together": False}


def same_config(stored: Mapping[str, Any], current: Mapping[str, Any], section: type[BaseModel] | None = None,
                at: str = "") -> bool:
    """Whether a config-dict stored by an earlier version describes the same run as `current`: equal, except
    that a field added since (absent from `stored`) matches when `current` holds what its absence meant (the
    field's default, or `BEFORE_FIELD`'s value where the default changed since). A field removed since never
    matches, and the async keys do not count between two synchronous runs (a sync run never reads them)."""
    if section is None:
        section = RunConfig
        fed, old = current.get("federation", {}), stored.get("federation", {})
        if fed.get("mode") != "async" and isinstance(old, Mapping) and old.get("mode") == fed.get("mode"):
            current = {**current, "federation": {k: v for k, v in fed.items() if k != "asynchronous"}}
            stored = {**stored, "federation": {k: v for k, v in old.items() if k != "asynchronous"}}
    if set(stored) - set(current):
        return False
    for key, value in current.items():
        field, path = section.model_fields.get(key), f"{at}{key}"
        if key not in stored:
            if field is None:
                return False
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):  # a whole section added since: each field as its absence meant
                if not same_config({}, value, field.annotation, f"{path}."):
                    return False
            elif BEFORE_FIELD.get(path, default) != value:
                return False
            continue
        sub = getattr(field, "annotation", None)
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, Mapping) and \
                isinstance(stored[key], Mapping):
            if not same_config(stored[key], value, sub, f"{path}."):
                return False
        elif stored[key] != value:
            return False
    return True
