"""Evaluation: per-domain losses against a hand-summed reference, the token-weighted overall, perplexity."""

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
