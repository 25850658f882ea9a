"""lm-evaluation-harness on a Photon model, offline, through local task files: a rolling log-likelihood equals
the model's own summed token loss, a multiple-choice accuracy equals the one computed by hand, greedy
generation stops where it should, bad task names are one line. Skipped without the optional extra."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from photon.data.shards import eval_batches  # noqa: E402
from photon.data.tokenizer import load_tokenizer  # noqa: E402
from photon.errors import UserError  # noqa: E402
from photon.model.transformer import Transformer  # noqa: E402
from photon.train.harness import PhotonLM, evaluate_tasks  # noqa: E402
from tests.helpers import tiny_cfg, torch_threads  # noqa: E402

T, B = 64, 8  # the tiny preset's seq_len and batch_size


@pytest.fixture(scope="module")
def trained(tiny_prep, tiny_prepared):
    """A tiny model trained for a few hundred steps on the fixture corpus's training tokens, and its tokenizer."""
    with torch_threads(1):
        torch.manual_seed(0)
        model = Transformer(tiny_cfg(tiny_prep).model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batches = [b for d in tiny_prepared.domains for b in eval_batches(tiny_prepared.tokens(d, "train"), T, B, 8)]
        for step in range(240):
            x, y = batches[step % len(batches)]
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return model, load_tokenizer(tiny_prepared.tokenizer_path)


def _task(folder, name, output_type, rows, extra):
    """A task YAML whose data is a local JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\noutput_type: {output_type}\n{extra}")
    return folder / f"{name}.yaml"


def _summed_nll(model, ids, max_len):
    """The model's own summed token loss on `ids`, the first token conditioned on end-of-text, in the windows
    the harness scores: each predicts the next `max_len` tokens (or what is left) with as much context before
    them as fits (one token after the first window; the last window is filled to `max_len`)."""
    stream, total, done = [0, *ids], 0.0, 0
    with torch.no_grad():
        while done < len(ids):
            n = min(max_len, len(ids) - done)
            end = done + 1 + n
            window = torch.tensor(stream[max(0, end - max_len - 1):end])
            logits, _ = model(window[None, :-1])
            total += F.cross_entropy(logits[0, -n:].double(), window[-n:], reduction="sum").item()
            done += n
    return total


def test_the_rolling_loglikelihood_of_a_text_is_the_models_summed_token_loss(trained, tmp_path, one_thread):
    model, tok = trained
    text = " ".join(["Dear Sir, the letter arrived this morning; def f(x): return x + 1."] * 12)  # the harness
    # strips a target's outer whitespace
    ids = tok.encode(text).ids
    assert len(ids) > 2 * model.cfg.max_seq_len  # several windows
    task = _task(tmp_path, "held_out_text", "loglikelihood_rolling", [{"text": text}],
                 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
    bpb = evaluate_tasks(model, tok, [str(task)], batch_size=4)["held_out_text"]["bits_per_byte"]
    want = _summed_nll(model, ids, model.cfg.max_seq_len)
    assert bpb * len(text.encode("utf-8")) * math.log(2) == pytest.approx(want, rel=1e-5)


def _passages(prepared, domain, n):
    """`n` passages of 36 tokens from `domain`'s validation tokens (none across a document's end)."""
    arr = np.asarray(prepared.tokens(domain, "val"))
    cuts = [arr[i:i + 36] for i in range(0, len(arr) - 36, 40)]
    return [c.tolist() for c in cuts if 0 not in c][:n]


def test_a_multiple_choice_accuracy_comes_out_of_the_harness_as_computed_by_hand(trained, tiny_prepared, tmp_path,
                                                                                 one_thread):
    # Which of two continuations follows a passage's opening: its own text, or as many random tokens.
    model, tok = trained
    domains = tiny_prepared.domains
    rows = []
    for domain in domains:
        for j, doc in enumerate(_passages(tiny_prepared, domain, 8)):
            noise = np.random.default_rng(j).integers(1, tok.get_vocab_size(), 12).tolist()
            choices = [tok.decode(doc[24:36]), tok.decode(noise)]
            if j % 2:
                choices.reverse()
            rows.append({"context": tok.decode(doc[:24]), "choices": choices, "label": j % 2})
    assert len(rows) == 8 * len(domains)
    task = _task(tmp_path / "tasks", "which_continues", "multiple_choice", rows,
                 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                 "metric_list:\n  - metric: acc\n")
    acc = evaluate_tasks(model, tok, [str(task.parent)], batch_size=3)["which_continues"]["acc"]

    def loglikelihood(context, continuation):  # the harness's split: trailing spaces go to the continuation
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        whole, head = tok.encode(context + continuation).ids, tok.encode(context).ids
        ids = torch.tensor(whole)
        with torch.no_grad():
            logits, _ = model(ids[None, :-1])
        logp = F.log_softmax(logits[0].float(), -1)
        return sum(logp[i - 1, ids[i]].item() for i in range(len(head), len(whole)))

    picks = [max(range(2), key=lambda c: loglikelihood(r["context"], " " + r["choices"][c])) for r in rows]
    by_hand = sum(p == r["label"] for p, r in zip(picks, rows)) / len(rows)
    assert acc == pytest.approx(by_hand, abs=1e-12)
    assert acc >= 0.75  # text is likelier than noise (chance is 0.5; noise also re-encodes to more tokens)


def test_greedy_generation_is_the_models_greedy_continuation_cut_at_a_stop(trained, one_thread):
    model, tok = trained
    lm = PhotonLM(model, tok)
    prompt = "def f(x):"
    ids = tok.encode(prompt).ids
    greedy = tok.decode(model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist())
    (free,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [], "max_gen_toks": 12}))])
    assert free == greedy.split("<|endoftext|>")[0][:len(free)] and free
    stop = free.strip()[:2]
    (cut,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 12}))])
    assert cut == free.split(stop)[0]
    assert lm._loglikelihood_tokens([(("def", ""), ids, [])]) == [(0.0, True)]  # nothing to score


def test_a_task_that_cannot_run_is_one_clear_line(trained, tmp_path, monkeypatch):
    model, tok = trained
    with pytest.raises(UserError, match="unknown task no_such_task") as e:
        evaluate_tasks(model, tok, ["no_such_task"])
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no task in it"):
        evaluate_tasks(model, tok, [str(tmp_path / "empty")])
    task = _task(tmp_path / "gone", "gone", "loglikelihood_rolling", [{"text": "x"}],
                 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
    (tmp_path / "gone" / "gone.jsonl").unlink()
    with pytest.raises(UserError, match="data file is missing"):
        evaluate_tasks(model, tok, [str(task)])


# During a run: train.eval_tasks on the global model (federated) or the model (centralized)


def _held_out_task(tmp_path):
    return _task(tmp_path / "tasks", "held_out", "loglikelihood_rolling",
                 [{"text": "A letter, never seen in training."}, {"text": "def g(y): return y"}],
                 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=120)


def test_a_federated_run_evaluates_its_tasks_when_due_and_at_the_end(tiny_prep, tmp_path, one_thread):
    from photon.runlog import read_metrics
    from tests.helpers import fed_cfg, run

    task = _held_out_task(tmp_path)
    cfg = fed_cfg(tiny_prep, f"train.eval_tasks={task}", "train.eval_tasks_every=2", "federation.rounds=3")
    run(cfg, tmp_path / "run", console=_quiet())
    rows = read_metrics(tmp_path / "run")
    tasks = [r for r in rows if r["kind"] == "tasks"]
    assert [r["round"] for r in tasks] == [0, 2, 3]  # every 2nd evaluation (rounds 0, 2) and the last
    assert all(0 < r["held_out/bits_per_byte"] < 20 for r in tasks)
    assert tasks[-1]["held_out/bits_per_byte"] < tasks[0]["held_out/bits_per_byte"]  # the model learned


def test_a_centralized_run_evaluates_its_tasks_and_a_bad_task_stops_a_run_before_it_trains(tiny_prep, tmp_path,
                                                                                           one_thread):
    from photon.runlog import read_metrics
    from photon.train.centralized import train_central
    from tests.helpers import fed_cfg, run

    task = _held_out_task(tmp_path)
    cfg = tiny_cfg(tiny_prep, f"train.eval_tasks={task}", "train.steps=20", "train.eval_every=10",
                   "train.ckpt_every=20", "train.eval_batches=1")
    train_central(cfg, tmp_path / "central", console=_quiet())
    assert [r["step"] for r in read_metrics(tmp_path / "central") if r["kind"] == "tasks"] == [0, 10, 20]

    bad = fed_cfg(tiny_prep, "train.eval_tasks=no_such_task")
    with pytest.raises(UserError, match="train.eval_tasks: unknown task no_such_task"):
        run(bad, tmp_path / "bad", console=_quiet())
    assert not [r for r in read_metrics(tmp_path / "bad") if r["kind"] == "round"]
