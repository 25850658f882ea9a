"""The verdict rules of the claims benchmark: one table, claim id -> the paper's claim, its threshold(s) and a
pure function from the measured values to "agrees", "contradicts" or "inconclusive".

This table is the only place a threshold is written. `render.py` measures the values from the stored record,
asks the claim's rule for the verdict, and every sentence that states a threshold reads it from the rule
(`Rule.bound_text`), so the verdict and the sentence that explains it cannot drift apart.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

AGREES, CONTRADICTS, INCONCLUSIVE, NOT_RUN = "agrees", "contradicts", "inconclusive", "not run"

_OPS = {"<": (operator.lt, "<", "below"), "<=": (operator.le, "≤", "at or below"),
        ">": (operator.gt, ">", "above"), ">=": (operator.ge, "≥", "at or above")}


@dataclass(frozen=True)
class EverySeed:
    """Per seed, the measured value against `bound`: agrees when every seed meets it, contradicts when none
    does, inconclusive when the seeds disagree or one has no value (it never reached the target)."""

    title: str  # the paper's claim, in a few words
    value: str  # what is measured per seed
    op: str  # "<", "<=", ">" or ">=": value `op` bound meets the claim
    bound: float
    network: str | None = None  # the network profile (`photon/bench/network.py` NETWORKS) a time is modelled on

    def meets(self, x: float) -> bool:
        return _OPS[self.op][0](x, self.bound)

    def bound_text(self) -> str:
        """The bound as a sentence states it, e.g. "≥ 1.5×"."""
        return f"{_OPS[self.op][1]} {self.bound:g}×"

    def bound_words(self) -> str:
        """The bound as a fraction in words, e.g. "below half"."""
        return f"{_OPS[self.op][2]} {fraction_words(self.bound)}"

    def judge(self, values: Sequence[float | None]) -> str:
        if not values or any(v is None for v in values):
            return INCONCLUSIVE
        met = [self.meets(v) for v in values]
        return AGREES if all(met) else CONTRADICTS if not any(met) else INCONCLUSIVE


@dataclass(frozen=True)
class Falling:
    """Mean time to the target per K, in increasing K: agrees when it falls at every step, contradicts when the
    largest K is no faster than the smallest, inconclusive otherwise or when an arm never reached the target."""

    title: str
    value: str
    network: str  # the network profile (`photon/bench/network.py` NETWORKS) the time is modelled on

    def judge(self, times: Sequence[float | None]) -> str:
        if len(times) < 2 or any(t is None for t in times):
            return INCONCLUSIVE
        if all(a > b for a, b in zip(times, times[1:])):
            return AGREES
        return CONTRADICTS if times[-1] >= times[0] else INCONCLUSIVE


@dataclass(frozen=True)
class Exactly:
    """A measured ratio against the one it must equal by construction: agrees when it is within `tolerance`
    (relative) of `expected` and above `floor`, contradicts otherwise."""

    title: str
    value: str
    tolerance: float
    floor: float

    def exact(self, ratio: float, expected: float) -> bool:
        return abs(ratio / expected - 1) < self.tolerance

    def judge(self, ratio: float, expected: float) -> str:
        return AGREES if self.exact(ratio, expected) and ratio > self.floor else CONTRADICTS


Rule = EverySeed | Falling | Exactly

RULES: dict[str, Rule] = {
    "1a": EverySeed("1. federated ≤ centralized perplexity, equal tokens",
                    "`photon` / `central` final perplexity", "<=", 1.0),
    "1b": EverySeed("1. the same, each client the centralized sample count (K× tokens, the paper's regime)",
                    "`paper` / `central` final perplexity", "<=", 1.0),
    "2": Falling("2. more clients, less time to a perplexity",
                 "mean modelled seconds to the worst final perplexity of the K arms", network="1 Gbps"),
    "3a": Exactly("3. H·(n−1)/n× less communication than per-step data-parallel (the paper: 64–512× at H = 64–512)",
                  "data-parallel bytes per token / Photon's", tolerance=0.01, floor=1.0),
    "3b": EverySeed("3. less wall time than data-parallel at {network}",
                    "data-parallel / Photon modelled seconds to the worse final perplexity", ">", 1.0,
                    network="10 Gbps"),
    "4": EverySeed("4. converges with one domain per client",
                   "by-domain final / initial perplexity", "<", 0.5),
    "5": EverySeed("5. ≈2× fewer tokens than DiLoCo to the same perplexity",
                   "`diloco` / `photon` tokens to the worse final perplexity", ">=", 1.5),
    "6": EverySeed("6. small batch + high LR is why",
                   "`photon` / `bigbatch` final perplexity", "<", 1.0),
}


def title(claim: str) -> str:
    """The claim's title, with the network it is judged on where it names one."""
    rule = RULES[claim]
    return rule.title.format(network=getattr(rule, "network", None))


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean over seeds, or None when a seed has no value (claim 2 compares means)."""
    return None if not values or any(v is None for v in values) else statistics.mean(values)


def fraction_words(x: float) -> str:
    """How a sentence says a fraction of a quantity: 0.5 -> "half", else "0.3×"."""
    return {0.5: "half", 0.25: "a quarter"}.get(x, f"{x:g}×")
