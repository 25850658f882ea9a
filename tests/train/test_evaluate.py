"""Evaluation: per-domain losses against a hand-summed reference, the token-weighted overall, perplexity,
bits per byte of the scored text."""

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
