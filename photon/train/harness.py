"""EleutherAI's lm-evaluation-harness on a Photon model: `photon eval CKPT --tasks ...` and a run's
`train.eval_tasks`.

`PhotonLM` is the harness's model class around Photon's own `Transformer` and tokenizer: log-likelihoods of
continuations (multiple-choice tasks) and rolling log-likelihoods of whole texts (perplexity tasks: the text
cut into windows of `max_seq_len` tokens, as the harness's own models score it), batched on the model's device,
and greedy generation (a request at a time). Tasks are the harness's registry names (their data comes from
the Hugging Face hub) or local task files: a YAML, or a folder of them, whose data may be a local JSONL
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`), which is how it runs offline.

The harness is an optional extra (`pip install -e '.[eval]'`): importing this module without it is one clear
error. Nothing here unpickles: the harness's request cache is left off.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from photon.errors import UserError
from photon.train.device import autocast

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise UserError("evaluation tasks need EleutherAI's lm-evaluation-harness, an optional extra: "
                    "pip install -e '.[eval]'") from None

log = logging.getLogger(__name__)

EOT_ID = 0  # Photon's end-of-text token, the context of a text's first token
DEFAULT_MAX_GEN_TOKS = 256
_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


class PhotonLM(TemplateLM):
    """The harness's view of a Photon model. Scores in fp32 (bf16 autocast where the run trains in bf16)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 16, bf16: bool = False):
        super().__init__()
        self.model = model.eval()
        self.tokenizer_ = tokenizer
        self.batch_size = batch_size
        self.bf16 = bf16
        self.max_length = model.cfg.max_seq_len  # the context every request is cut to, generation's too
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer_.decode(list(ids))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request
        `(strings, context ids, continuation ids)`. Longest first, so a batch pads little; the context is cut
        from the left to fit `max_length` (padding on the right cannot reach earlier positions: the model is
        causal)."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in range(0, len(order), self.batch_size):
            rows = []
            for i in order[start:start + self.batch_size]:
                _, context, continuation = requests[i]
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                n = min(len(continuation), len(whole) - 1)
                rows.append((i, whole, n))
            width = max(len(w) - 1 for _, w, _ in rows)
            x = torch.full((len(rows), width), EOT_ID, dtype=torch.long)
            for j, (_, whole, _) in enumerate(rows):
                x[j, :len(whole) - 1] = torch.tensor(whole[:-1])
            with autocast(self.device, self.bf16):
                logits, _ = self.model(x.to(self.device))
            logp = F.log_softmax(logits.float(), dim=-1).cpu()
            for j, (i, whole, n) in enumerate(rows):
                if n == 0:  # nothing to score (an empty continuation): certain, and what greedy decoding gives
                    out[i] = (0.0, True)
                    continue
                end = len(whole) - 1  # positions end-n .. end-1 predict the last n tokens
                target = torch.tensor(whole[-n:])
                scores = logp[j, end - n:end]
                ll = scores.gather(1, target[:, None]).sum().item()
                out[i] = (ll, bool(torch.equal(scores.argmax(-1), target)))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The summed log-likelihood of each whole text, its first token conditioned on end-of-text."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=EOT_ID, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[k] += ll
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut at the first of its stop strings (or end-of-text, or max_gen_toks)."""
        out = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            idx = torch.tensor([self.tok_encode(context) or [EOT_ID]], device=self.device)
            new: list[int] = []
            text = ""
            for _ in range(budget):  # one token at a time, to stop at a stop string
                with autocast(self.device, self.bf16):
                    idx = self.model.generate(idx, 1, temperature=0)  # greedy, on the last max_seq_len tokens
                token = int(idx[0, -1])
                if token == EOT_ID:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def _local_task_names(path: Path, what: str) -> list[str]:
    """The task names that a task YAML (or every YAML under a folder) declares."""
    files = [path] if path.is_file() else sorted(path.rglob("*.y*ml"))
    names = [m.group(1) for f in files for m in _TASK_LINE.finditer(f.read_text(errors="replace"))]
    if not names:
        raise UserError(f"{what} {path}: no task in it (a task YAML has a 'task: NAME' line)")
    return names


def resolve_tasks(tasks: Sequence[str], what: str = "--tasks") -> tuple[list[str], TaskManager]:
    """The task names to run and a harness task manager that knows them: each entry of `tasks` is a registry
    name, a task YAML or a folder of them. `what` names the setting in errors."""
    names: list[str] = []
    include: list[str] = []
    registry = False
    for entry in tasks:
        path = Path(entry)
        if path.exists():
            names += _local_task_names(path, what)
            include.append(str(path.parent if path.is_file() else path))
        else:
            names.append(entry)
            registry = True
    if not names:
        raise UserError(f"{what}: name at least one task (e.g. arc_easy, or a task YAML)")
    manager = TaskManager(include_path=include or None, include_defaults=registry)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"{what}: unknown task {', '.join(unknown)} (not a file, a folder or a task of "
                        f"lm-eval {lm_eval.__version__}; `lm-eval ls tasks` lists them)")
    return list(dict.fromkeys(names)), manager


def evaluate_tasks(model: nn.Module, tokenizer: Tokenizer, tasks: Sequence[str], batch_size: int = 16,
                   bf16: bool = False, limit: int | None = None, what: str = "--tasks",
                   resolved: tuple[list[str], TaskManager] | None = None) -> dict[str, dict[str, float]]:
    """Each task's metrics through the harness ({task: {metric: value}}, e.g. {"arc_easy": {"acc": 0.41,
    "acc_norm": 0.39}}); standard errors are not computed. `limit`: at most that many examples per task.
    `resolved`: what `resolve_tasks` gave for `tasks` (a run resolves its tasks once: indexing the harness's
    registry takes seconds)."""
    names, manager = resolved or resolve_tasks(tasks, what)
    was_training = model.training
    # The harness warns of every metric default a task YAML leaves out: noise beside the results.
    harness_log = logging.getLogger("lm_eval")
    level = harness_log.level
    harness_log.setLevel(logging.ERROR)
    try:
        results = lm_eval.simple_evaluate(
            model=PhotonLM(model, tokenizer, batch_size=batch_size, bf16=bf16), tasks=names,
            task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    except ConnectionError as e:  # datasets' word for a hub it cannot reach (HF_HUB_OFFLINE=1 says so at once)
        raise UserError(f"{what} {','.join(names)}: a task's data could not be fetched from the Hugging Face "
                        f"hub ({_first_line(e)}); offline, give a local task YAML whose data is a local JSONL"
                        ) from None
    except FileNotFoundError as e:
        raise UserError(f"{what} {','.join(names)}: a task's data file is missing ({_first_line(e)})") from None
    finally:
        model.train(was_training)
        harness_log.setLevel(level)
    return {task: _metrics(values) for task, values in results["results"].items()}


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _metrics(values: dict) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...} → {"acc": 0.5}."""
    out = {}
    for key, value in values.items():
        metric, _, _ = key.partition(",")
        if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) \
                or isinstance(value, bool):
            continue
        out[metric] = float(value)
    return out

