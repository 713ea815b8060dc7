"""Intervals and the verdict rules of an experiment's claims (pure functions of numbers).

Accuracy intervals, paired over items and seeds
    An evaluation gives, per seed s (1..S) and item i (1..N, the same N items for every seed: the
    items are drawn with `data.data_seed`, not the training seed), a value x[s][i]: 1/0 for a
    correct/wrong answer, or a paired difference c_A[s][i] - c_B[s][i] in {-1, 0, 1} between two
    arms trained with the same seed (same data order) and scored on the same item. The estimate
    is the mean over all S x N values. Its two sources of sampling error are the training seed and
    which items the benchmark drew:
        seed term  h_s = t_{0.975, S-1} * sd_s / sqrt(S), sd_s the sample SD of the S per-seed means
                   (0 with one seed: not estimable, and the doc says so);
        item term  h_i = 1.96 * sd_i / sqrt(N), sd_i the sample SD of the N per-item means (mean over seeds);
    the 95% interval is mean +- sqrt(h_s^2 + h_i^2), cut to the values' range ([0, 1] for an
    accuracy, [-1, 1] for a difference). Both terms hold the seed x item interaction, so the
    interval errs on the wide side.

Ratio of two rates (k1/n1) / (k2/n2): Katz's log interval, exp(log r +- 1.96 sqrt(1/k1 - 1/n1 +
    1/k2 - 1/n2)); with a zero count, 0.5 is added to each k and each n - k (Haldane).
A share k/n (steps with g > 1, a correction rate): the Wilson score interval (audit.wilson).

Verdicts: each rule maps its evidence to "held", "not held" or "inconclusive" with the reason in
words (RULES; each rule's `text` is printed in the report as its decision rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Z975 = 1.959963984540054  # the standard normal's 97.5% quantile
HELD, NOT_HELD, INCONCLUSIVE, NOT_RUN = "held", "not held", "inconclusive", "not run"

# Student t 97.5% quantiles for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df), 10 digits)
_T975 = (
    12.7062047362, 4.3026527297, 3.1824463053, 2.7764451052, 2.5705818356, 2.4469118511, 2.3646242516, 2.3060041352, 2.2621571628, 2.228138852,
    2.2009851601, 2.1788128297, 2.1603686565, 2.1447866879, 2.1314495456, 2.1199052992, 2.1098155778, 2.1009220402, 2.0930240544, 2.0859634473,
    2.0796138447, 2.0738730679, 2.0686576104, 2.0638985616, 2.0595385528, 2.0555294386, 2.0518305165, 2.0484071418, 2.0452296421, 2.0422724563,
)  # fmt: skip


def t975(df: int) -> float:
    """Student t's 97.5% quantile: the table up to 30 degrees of freedom, then the Cornish-Fisher
    expansion z + (z^3 + z) / 4df + (5z^5 + 16z^3 + 3z) / 96df^2 (error < 1e-4 beyond 30)."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _sd(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval and the two half-widths it combines (module doc)."""

    mean: float
    lo: float
    hi: float
    seeds: int
    items: int
    seed_half: float = 0.0
    item_half: float = 0.0

    @property
    def defined(self) -> bool:
        return math.isfinite(self.mean) and math.isfinite(self.lo) and math.isfinite(self.hi)

    def points(self, signed: bool = False) -> str:
        """`41.2 [38.0, 44.4]` in percentage points (`+3.1 [-0.4, +6.6]` when signed)."""
        if not self.defined:
            return "–"
        f = "{:+.1f}" if signed else "{:.1f}"
        return f"{f.format(100 * self.mean)} [{f.format(100 * self.lo)}, {f.format(100 * self.hi)}]"


NAN_INTERVAL = Interval(float("nan"), float("nan"), float("nan"), 0, 0)


def paired_interval(values: Sequence[Sequence[float]], bounds: tuple[float, float] | None = None) -> Interval:
    """values[s][i]: seed s, item i (every seed the same items, same order) -> the mean over all
    values with its 95% interval (module doc: seed and item terms added in quadrature), cut to
    `bounds` (an accuracy lies in [0, 1], a paired difference in [-1, 1])."""
    rows = [list(map(float, r)) for r in values]
    if not rows or not rows[0]:
        return NAN_INTERVAL
    n = len(rows[0])
    if any(len(r) != n for r in rows):
        raise ValueError(f"paired_interval: every seed needs the same items; got {[len(r) for r in rows]} values per seed")
    s = len(rows)
    mean = sum(map(sum, rows)) / (s * n)
    seed_half = t975(s - 1) * _sd([sum(r) / n for r in rows]) / math.sqrt(s) if s > 1 else 0.0
    item_half = Z975 * _sd([sum(r[i] for r in rows) / s for i in range(n)]) / math.sqrt(n) if n > 1 else 0.0
    half = math.hypot(seed_half, item_half)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return Interval(mean, lo, hi, s, n, seed_half, item_half)


def wilson(k: int, n: int) -> tuple[float, float]:
    from srpo_core.audit import wilson as _wilson

    return _wilson(k, n)


@dataclass(frozen=True)
class RatioInterval:
    """(k1/n1) / (k2/n2) with Katz's 95% log interval (module doc)."""

    k1: int
    n1: int
    k2: int
    n2: int

    @property
    def corrected(self) -> bool:
        return 0 in (self.k1, self.k2, self.n1 - self.k1, self.n2 - self.k2)

    @property
    def _cells(self) -> tuple[float, float, float, float]:
        a = 0.5 if self.corrected else 0.0
        return self.k1 + a, self.n1 + 2 * a, self.k2 + a, self.n2 + 2 * a

    @property
    def defined(self) -> bool:
        return self.n1 > 0 and self.n2 > 0

    @property
    def ratio(self) -> float:
        k1, n1, k2, n2 = self._cells
        return (k1 / n1) / (k2 / n2) if self.defined else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        if not self.defined:
            return float("nan"), float("nan")
        k1, n1, k2, n2 = self._cells
        se = math.sqrt(1 / k1 - 1 / n1 + 1 / k2 - 1 / n2)
        r = self.ratio
        return r * math.exp(-Z975 * se), r * math.exp(Z975 * se)


# ---- the rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    status: str  # HELD | NOT_HELD | INCONCLUSIVE | NOT_RUN
    reason: str


def decide_better(diff: Interval) -> Decision:
    """A > B from the paired difference A - B."""
    if not diff.defined:
        return Decision(INCONCLUSIVE, "no paired evaluation to compare")
    if diff.lo > 0:
        return Decision(HELD, "the interval of the difference lies above 0")
    if diff.hi < 0:
        return Decision(NOT_HELD, "the interval of the difference lies below 0: the second arm is better")
    return Decision(INCONCLUSIVE, "the interval of the difference contains 0 (intervals overlap)")


def decide_equivalent(diff: Interval, margin: float) -> Decision:
    """A ~ B: the paired difference within +-margin."""
    if not diff.defined:
        return Decision(INCONCLUSIVE, "no paired evaluation to compare")
    if -margin < diff.lo and diff.hi < margin:
        return Decision(HELD, f"the interval of the difference lies within ±{100 * margin:.0f} points")
    if diff.lo > 0 or diff.hi < 0:
        return Decision(NOT_HELD, f"the interval of the difference excludes 0 and leaves ±{100 * margin:.0f} points")
    return Decision(INCONCLUSIVE, f"the interval contains 0 but reaches beyond ±{100 * margin:.0f} points")


def decide_best_of(diffs: Sequence[Interval]) -> Decision:
    """The reference arm beats every alternative: diffs = reference - alternative."""
    if not diffs or not all(d.defined for d in diffs):
        return Decision(INCONCLUSIVE, "an alternative has no paired evaluation")
    if all(d.lo > 0 for d in diffs):
        return Decision(HELD, "every difference lies above 0")
    if any(d.hi < 0 for d in diffs):
        return Decision(NOT_HELD, "an alternative is better (its difference lies below 0)")
    return Decision(INCONCLUSIVE, "a difference contains 0 (intervals overlap)")


def decide_not_worse(diff: Interval, margin: float) -> Decision:
    """A >= B: not held when B is better (A - B below 0), held when A is no worse than margin."""
    if not diff.defined:
        return Decision(INCONCLUSIVE, "no paired evaluation to compare")
    if diff.hi < 0:
        return Decision(NOT_HELD, "the interval of the difference lies below 0: the second arm is better")
    if diff.lo > -margin:
        return Decision(HELD, f"the interval of the difference lies above -{100 * margin:.0f} points")
    return Decision(INCONCLUSIVE, f"the interval contains 0 and reaches below -{100 * margin:.0f} points")


def decide_share_above(k: int, n: int, threshold: float) -> Decision:
    """The share k/n above `threshold` (Wilson 95%)."""
    if n <= 0:
        return Decision(INCONCLUSIVE, "no step where it is defined")
    lo, hi = wilson(k, n)
    if lo > threshold:
        return Decision(HELD, f"the Wilson interval of the share lies above {threshold:g}")
    if hi < threshold:
        return Decision(NOT_HELD, f"the Wilson interval of the share lies below {threshold:g}")
    return Decision(INCONCLUSIVE, f"the Wilson interval of the share contains {threshold:g}")


def decide_ratio_in_band(ratio: RatioInterval, band: tuple[float, float]) -> Decision:
    """Rate 1 is a multiple of rate 2 within `band` ("~2x": band (1.5, 3))."""
    if not ratio.defined:
        return Decision(INCONCLUSIVE, "no seed on one side")
    lo, hi = ratio.interval
    if hi < band[0]:
        return Decision(NOT_HELD, f"the ratio's interval lies below {band[0]:g}")
    if lo > band[1]:
        return Decision(NOT_HELD, f"the ratio's interval lies above {band[1]:g}")
    if lo > 1:
        return Decision(HELD, f"the ratio's interval lies above 1 and meets [{band[0]:g}, {band[1]:g}]")
    return Decision(INCONCLUSIVE, f"the ratio's interval contains 1 (and meets [{band[0]:g}, {band[1]:g}])")


@dataclass(frozen=True)
class Rule:
    """A verdict rule: the evidence it reads (`evidence`: "diff" = paired differences of final
    accuracy, reference arm minus each other arm; "diff_budget" = the same at equal rollouts consumed; "g_ratio" = steps with g > 1; "correction" =
    clean vs erroneous correction rates) and its decision in words."""

    evidence: str
    decide: Callable[..., Decision]
    text: str


RULES: dict[str, Rule] = {
    "better": Rule("diff", decide_better, "held if the 95% interval of the paired difference (first arm − second) lies above 0; not held if it lies below 0; else inconclusive."),
    "better_at_budget": Rule(
        "diff_budget",
        decide_better,
        "as `better`, each arm at its last evaluation within the smaller of the two arms' final rollouts consumed (the same budget of sampled chains).",
    ),
    "equivalent": Rule("diff", decide_equivalent, "held if the 95% interval of the paired difference lies within ±margin; not held if it excludes 0 and leaves ±margin; else inconclusive."),
    "best_of": Rule("diff", decide_best_of, "held if every paired difference (first arm − each other) lies above 0; not held if one lies below 0; else inconclusive."),
    "not_worse": Rule("diff", decide_not_worse, "not held if the 95% interval of the paired difference (first arm − second) lies below 0; held if it lies above −margin; else inconclusive."),
    "share_above": Rule("g_ratio", decide_share_above, "held if the Wilson 95% interval of the share of (seed, step) pairs with g > 1 lies above the threshold; not held if below; else inconclusive."),
    "ratio_in_band": Rule(
        "correction",
        decide_ratio_in_band,
        "held if the 95% (Katz) interval of clean / erroneous suffix correction rate lies above 1 and meets the band; not held if it lies entirely below or above the band; else inconclusive.",
    ),
}
