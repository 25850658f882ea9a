"""Evaluation: per-domain losses against a hand-summed reference, the token-weighted overall, perplexity,
bits per byte of the scored text."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from photon.data.shards import eval_batches
from photon.model.transformer import Transformer
from photon.train.evaluate import OVERALL, evaluate, perplexity
from tests.helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box

T, B, N = 64, 8, 4  # the tiny preset's seq_len, batch_size, eval_batches


@pytest.fixture(scope="module")
def model(tiny_prep):
    torch.manual_seed(0)
    return Transformer(tiny_cfg(tiny_prep).model)


def _reference(model, prepared):
    """Summed token losses and token counts per domain, one sequence at a time."""
    sums, counts = {}, {}
    with torch.no_grad():
        for d in prepared.domains:
            sums[d], counts[d] = 0.0, 0
            for x, y in eval_batches(prepared.tokens(d, "val"), T, B, N):
                for row in range(x.shape[0]):
                    logits, _ = model(x[row:row + 1])
                    sums[d] += F.cross_entropy(logits[0].double(), y[row], reduction="sum").item()
                    counts[d] += y.shape[1]
    return sums, counts


def test_matches_reference_and_overall_is_token_weighted(model, tiny_prepared):
    losses = evaluate(model, tiny_prepared, T, B, N)
    sums, counts = _reference(model, tiny_prepared)
    assert list(losses) == [*tiny_prepared.domains, OVERALL]
    for d in tiny_prepared.domains:
        assert losses[d] == pytest.approx(sums[d] / counts[d], rel=1e-5)
    assert losses[OVERALL] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)
    # The domains score different numbers of tokens, so weighting matters: not the plain mean.
    assert len(set(counts.values())) > 1
    plain = sum(losses[d] for d in tiny_prepared.domains) / len(tiny_prepared.domains)
    weighted = sum(losses[d] * counts[d] for d in counts) / sum(counts.values())
    assert losses[OVERALL] == pytest.approx(weighted, rel=1e-9)
    assert abs(weighted - plain) > 1e-6


def test_same_numbers_twice_and_mode_restored(model, tiny_prepared):
    model.train()
    a = evaluate(model, tiny_prepared, T, B, N)
    assert model.training  # evaluate restores the caller's mode
    model.eval()
    b = evaluate(model, tiny_prepared, T, B, N)
    assert not model.training
    assert a == b


def test_untrained_model_is_near_uniform(model, tiny_prepared):
    losses = evaluate(model, tiny_prepared, T, B, N)
    assert all(abs(v - math.log(1024)) < 0.2 for v in losses.values())


def test_bf16_is_close(model, tiny_prepared):
    a = evaluate(model, tiny_prepared, T, B, 1)
    b = evaluate(model, tiny_prepared, T, B, 1, bf16=True)
    assert b[OVERALL] == pytest.approx(a[OVERALL], rel=2e-2)


def test_perplexity_is_exp_loss():
    for loss in (0.0, 0.5, 2.0, math.log(1024)):
        assert perplexity(loss) == pytest.approx(math.exp(loss))
    assert math.isfinite(perplexity(1e4))  # capped, never overflows


# ---------------------------------------------------------------------------------------------------------
# Bits per byte


def test_token_byte_lengths_sum_to_the_texts_utf8_bytes(tiny_prepared):
    from photon.data.tokenizer import load_tokenizer, token_byte_lengths

    tok = load_tokenizer(tiny_prepared.tokenizer_path)
    lengths = token_byte_lengths(tok)
    assert lengths[0] == 0  # EOT has no text
    for text in ("def f(x):\n    return x + 1\n", "naïve café — 東京 ✓", "plain words and numbers 12345"):
        ids = tok.encode(text).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text


def test_scored_bytes_are_the_bytes_of_the_scored_targets(tiny_prepared):
    from photon.data.tokenizer import load_tokenizer
    from photon.train.evaluate import scored_bytes

    tok = load_tokenizer(tiny_prepared.tokenizer_path)
    counts = scored_bytes(tiny_prepared, T, B, N)
    for d in tiny_prepared.domains:
        targets = torch.cat([y.reshape(-1) for _, y in eval_batches(tiny_prepared.tokens(d, "val"), T, B, N)])
        text = tok.decode(targets.tolist(), skip_special_tokens=True)  # the targets are one contiguous span
        assert counts[d] == (targets.numel(), len(text.encode("utf-8"))), d
    assert counts[OVERALL] == tuple(map(sum, zip(*(counts[d] for d in tiny_prepared.domains))))


def test_bits_per_byte_is_the_summed_loss_in_bits_over_the_bytes():
    from photon.train.evaluate import bits_per_byte

    counts = {"a": (100, 400), "b": (300, 600), OVERALL: (400, 1000)}
    losses = {"a": 2.0, "b": 1.0, OVERALL: (2.0 * 100 + 1.0 * 300) / 400}
    bpb = bits_per_byte(losses, counts)
    assert bpb["a"] == pytest.approx(200 / math.log(2) / 400)
    assert bpb[OVERALL] == pytest.approx((200 + 300) / math.log(2) / 1000)  # summed, not a mean of ratios
    assert bits_per_byte({"c": 1.0}, counts) == {}  # no byte count: no figure


# ---------------------------------------------------------------------------------------------------------
# Any held-out text (photon eval --text)


def _stream(tok, docs):
    return [i for d in docs for i in [*tok.encode(d).ids, 0]]  # each document ends with EOT, as in the shards


def test_a_short_text_is_scored_as_one_sequence(model, tiny_prepared, tmp_path):
    from photon.data.corpora import file_documents
    from photon.data.tokenizer import load_tokenizer
    from photon.train.evaluate_text import evaluate_text, text_domains

    tok = load_tokenizer(tiny_prepared.tokenizer_path)
    (tmp_path / "notes.txt").write_text("Dear Sir, the café opens at nine.\n\nprint('hello')\n")
    docs = list(file_documents(tmp_path / "notes.txt"))  # paragraphs, as prepare reads one .txt file
    assert len(docs) == 2
    losses, counts = evaluate_text(model, tok, text_domains(tmp_path / "notes.txt"), T, B)
    ids = torch.tensor(_stream(tok, docs))
    assert len(ids) <= T + 1
    with torch.no_grad():
        logits, _ = model(ids[None, :-1], ids[None, 1:])
    want = F.cross_entropy(logits[0].float(), ids[1:]).item()
    assert losses["notes"] == pytest.approx(want, rel=1e-5) and losses[OVERALL] == losses["notes"]
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    first = len(tok.id_to_token(int(ids[0])))  # the first token is context only: its bytes are not scored
    assert counts["notes"] == (len(ids) - 1, text_bytes - first)


def test_a_long_text_scores_every_token_after_the_first_once_per_domain(model, tiny_prepared, tmp_path):
    from photon.data.corpora import file_documents
    from photon.data.tokenizer import load_tokenizer
    from photon.train.evaluate_text import evaluate_text, text_domains

    tok = load_tokenizer(tiny_prepared.tokenizer_path)
    texts = {"letters": [f"Letter {i}: the weather was fine and the post was late." for i in range(40)],
             "code": [f"def f{i}(x):\n    return x * {i}\n" for i in range(60)]}
    for name, docs in texts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    losses, counts = evaluate_text(model, tok, text_domains(tmp_path), T, B)
    assert set(losses) == {"letters", "code", OVERALL}
    for name in texts:
        docs = list(file_documents(tmp_path / name / "docs.jsonl"))  # as prepare takes them (stripped)
        ids = _stream(tok, docs)
        assert len(ids) > 3 * (T + 1)  # several windows and a shorter last one
        assert counts[name][0] == len(ids) - 1
        assert counts[name][1] == sum(len(d.encode("utf-8")) for d in docs) - len(tok.id_to_token(ids[0]))
    assert counts[OVERALL] == (counts["letters"][0] + counts["code"][0], counts["letters"][1] + counts["code"][1])
    mixed = (losses["letters"] * counts["letters"][0] + losses["code"] * counts["code"][0]) / counts[OVERALL][0]
    assert losses[OVERALL] == pytest.approx(mixed)


def test_text_that_cannot_be_scored_is_one_clear_error(model, tiny_prepared, tmp_path):
    from photon.data.tokenizer import load_tokenizer
    from photon.errors import UserError
    from photon.train.evaluate_text import evaluate_text, text_domains

    (tmp_path / "notes.md").write_text("# not a supported suffix\n")
    with pytest.raises(UserError, match=r"notes.md: evaluate .txt, .jsonl or .parquet files"):
        text_domains(tmp_path / "notes.md")
    with pytest.raises(UserError, match="no such directory"):
        text_domains(tmp_path / "missing")
    (tmp_path / "one.jsonl").write_text('{"text": ""}\n')
    tok = load_tokenizer(tiny_prepared.tokenizer_path)
    with pytest.raises(UserError, match="one"):
        evaluate_text(model, tok, text_domains(tmp_path / "one.jsonl"), T, B)
