"""The training summary's gain: accuracy after minus before on the same items, with its paired
95% interval, hand-computed."""

import math

from srpo_core.flow_driver import History, gains, paired_gain


def _outcomes(correct: list[int], skip: tuple[int, ...] = ()) -> list[dict]:
    return [{"id": f"i{k}", "correct": bool(c), **({"skipped": True} if k in skip else {})} for k, c in enumerate(correct)]


def test_paired_gain_by_hand():
    before = _outcomes([0, 0, 1, 1, 0])
    after = _outcomes([1, 0, 1, 0, 1])
    g = paired_gain("synthetic", before, after, 6)
    # d = [1, 0, 0, -1, 1]: mean 0.2, sd (ddof 1) = sqrt((0.64 + 0.04 + 0.04 + 1.44 + 0.64) / 4) = sqrt(0.7)
    half = 1.96 * math.sqrt(0.7) / math.sqrt(5)
    assert (g.n, g.before, g.after) == (5, 0.4, 0.6)
    assert math.isclose(g.gain, 0.2, abs_tol=1e-12) and math.isclose(g.low, 0.2 - half, abs_tol=1e-12) and math.isclose(g.high, 0.2 + half, abs_tol=1e-12)


def test_only_items_scored_both_times_count():
    g = paired_gain("b", _outcomes([1, 0, 1], skip=(2,)), _outcomes([1, 1, 0]), 3)
    assert g.n == 2 and g.gain == 0.5


def test_gains_compare_the_last_evaluation_with_step_zero():
    h = History({}, {}, {}, {}, {"synthetic": {0: _outcomes([0, 0]), 3: _outcomes([1, 0]), 6: _outcomes([1, 1])}, "other": {3: _outcomes([1])}}, [])
    (g,) = gains(h)  # "other" has no step-0 evaluation: no gain
    assert (g.benchmark, g.at_step, g.gain) == ("synthetic", 6, 1.0)
