"""The training summary's gain: accuracy after minus before on the same items, with its paired
95% interval, hand-computed; and what collect_history reads back from MLflow and the store."""

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


def test_collect_history_reads_each_stored_file_once(tmp_path, monkeypatch):
    """The summary's records: every step's rollouts.jsonl (a step without one is skipped), one
    store request each; the evaluation outcomes per benchmark and step; the metric histories from MLflow."""
    import json
    from types import SimpleNamespace

    from srpo_core import store as S
    from srpo_core.flow_driver import Plan, collect_history

    store = S.open_store(str(tmp_path))
    rows = {0: [{"step": 0, "reward": 1.0}], 2: [{"step": 2, "reward": 0.0}, {"step": 2, "reward": 1.0}]}  # step 1: none
    for step, recs in rows.items():
        store.put_bytes(f"{S.step_prefix('t', step)}/rollouts.jsonl", ("\n".join(json.dumps(r) for r in recs) + "\n\n").encode())
    store.put_bytes("runs/t/eval/000003/run-a/synthetic.jsonl", b'{"id": "i0", "correct": true}\n')
    metrics = {"eval/synthetic/accuracy": 0.5, "reward/base/mean": 0.25, "reset/index_hist/2": 3.0}
    client = SimpleNamespace(
        get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(metrics=metrics)),
        get_metric_history=lambda run_id, key: [SimpleNamespace(step=s, value=metrics[key]) for s in (0, 3)],
    )
    requests: list[str] = []  # the keys the store is asked about (get or exists: one round trip each on S3)
    for name in ("get_bytes", "exists"):
        method = getattr(type(store), name)
        monkeypatch.setattr(type(store), name, lambda self, key, method=method: requests.append(key) or method(self, key))
    plan = Plan({}, "t", str(tmp_path), total_steps=3, next_step=3, mlflow_run_id="r", tracking_uri="")
    h = collect_history(plan, client)
    assert h.records == rows[0] + rows[2]
    assert h.outcomes == {"synthetic": {3: [{"id": "i0", "correct": True}]}}
    assert h.curves == {"eval/synthetic/accuracy": [(0, 0.5), (3, 0.5)]} and h.reward == {"reward/base/mean": [(0, 0.25), (3, 0.25)]} and h.reset_hist == {2: 6.0}
    assert sorted(requests) == sorted({f"{S.step_prefix('t', s)}/rollouts.jsonl" for s in range(3)} | {"runs/t/eval/000003/run-a/synthetic.jsonl"})  # each once
