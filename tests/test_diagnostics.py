"""The paper's reward rules and diagnostics: unfinished chains score 0 (training and evaluation, on
real benchmark items), the per-task seed rule, localization errors fall back to thought 1, the
gradient-signal ratio of app. 14.1 by hand, and the live localization audit on a scripted engine."""

from __future__ import annotations

import logging
import math

import pytest

from srpo_core import audit, metrics, step
from srpo_core import rollouts as R
from srpo_core.config import ConfigError, load_config
from srpo_core.engine.base import Rollout
from srpo_core.evaluate import evaluate
from srpo_core.methods import resets
from srpo_core.records import records_jsonl
from srpo_core.tasks import SyntheticTask, TaskItem, get_task, synthetic
from tests.scripted_engine import ScriptedEngine
from tests.test_eval import CharEngine

UNFINISHED = ("max_thoughts", "max_response", "max_model_len", "eos")
BENCHMARKS = ("numinamath_olympiads", "math_level5", "commonsenseqa", "strategyqa")
PROBLEMS = {p.id: p for p in synthetic.make_split("train", 3, seed=0)}


def chain(text: str, finish: str, prefix_len: int = 0) -> Rollout:
    ids = [ord(c) for c in text]
    return Rollout([1, 2], ids, prefix_len, [(prefix_len, len(ids))], [0.0] * (len(ids) - prefix_len), [text[prefix_len:]], text, finish)


def right_answer_text(item: TaskItem) -> str:
    return f"Working it out.</thought>So the answer is \\boxed{{{item.gold}}}</thought>"


# ---- reward 0 for a chain that ends without an answer -------------------------------------------------


@pytest.mark.parametrize("bench", BENCHMARKS)
@pytest.mark.parametrize("finish", UNFINISHED)
def test_unfinished_chain_with_the_right_answer_scores_zero_in_training(bench, finish):
    task = get_task(bench)
    item = task.items("test", 1, 0)[0]  # a real item of the packaged sample
    text = right_answer_text(item)
    assert task.reward(item, text) == 1.0  # the text holds the right boxed answer
    assert R.chain_reward(task, item, chain(text, "answer")) == 1.0
    assert R.chain_reward(task, item, chain(text, finish)) == 0.0
    assert [a.reward for a in R.verify(task, item, [chain(text, finish), chain(text, "answer")])] == [0.0, 1.0]
    assert R.chain_reward(task, item, chain(text, finish), score_unfinished=True) == 1.0  # the option scores the text


@pytest.mark.parametrize("finish", UNFINISHED)
def test_unfinished_chain_is_a_seed_and_an_unfinished_suffix_scores_zero(finish):
    task = get_task("numinamath_olympiads")
    item = task.items("test", 1, 0)[0]
    text = right_answer_text(item)
    state = R.PromptState(item, [1, 2])
    R.absorb(task, state, R.verify(task, item, [chain(text, finish), chain(text, "answer")]), R.SeedSearch(R.SPLITS["1x4"], 12, 8))
    assert len(state.seeds) == 1 and state.seeds[0].rollout.finish_reason == finish  # wrong by the paper's rule: the seed
    assert [a.reward for a in state.collected] == [1.0]
    suffixes = [[chain(text, finish, prefix_len=3), chain(text, "answer", prefix_len=3)]]
    recs = R.build_records(task, 0, [state], [R.Localization(1, "random")], suffixes)
    assert [r.reward for r in recs if r.group == "shared_prefix"] == [0.0, 1.0]
    recs = R.build_records(task, 0, [state], [R.Localization(1, "random")], suffixes, score_unfinished=True)
    assert [r.reward for r in recs if r.group == "shared_prefix"] == [1.0, 1.0]


@pytest.mark.parametrize("bench", ("numinamath_olympiads", "commonsenseqa"))
@pytest.mark.parametrize("finish", UNFINISHED)
def test_unfinished_chain_scores_zero_in_evaluation(bench, finish):
    task = get_task(bench)
    items = task.items("test", 3, 0)
    gold = {it.question: it.gold for it in items}

    def engine(finish_reason):
        e = CharEngine(lambda prompt, j, t: next(f"Step.</thought>\\boxed{{{g}}}</thought>" for q, g in gold.items() if q[:60] in prompt))
        base = e.generate_thoughts

        def generate(requests, limits, sampling):
            out = base(requests, limits, sampling)
            for rs in out:
                for r in rs:
                    r.finish_reason = finish_reason
            return out

        e.generate_thoughts = generate
        return e

    cfg = load_config("tiny", {"rollout.max_prompt_tokens": 100_000})
    assert evaluate(engine("answer"), task, items, cfg, progress=False).accuracy == 1.0
    res = evaluate(engine(finish), task, items, cfg, progress=False)
    assert res.accuracy == 0.0 and all(o["reward"] == 0.0 and o["finish_reason"] == finish for o in res.outcomes)
    scored = cfg.override(**{"rollout.score_unfinished": True})
    assert evaluate(engine(finish), task, items, scored, progress=False).accuracy == 1.0


# ---- the seed rule per task -----------------------------------------------------------------------------


def test_the_seed_rule_is_the_tasks_and_the_threshold_overrides_it():
    synth = SyntheticTask()
    it = synth.items("train", 1, 0)[0]
    assert synth.is_incorrect(it, 0.0) and not synth.is_incorrect(it, 1.0)
    math_task = get_task("numinamath_olympiads")
    mit = math_task.items("test", 1, 0)[0]
    assert math_task.is_incorrect(mit, 0.0) and not math_task.is_incorrect(mit, 1.0)
    code = get_task("livecodebench_medium")
    cit = code.items("train", 1, 0)[0]
    assert code.is_incorrect(cit, 0.6) and code.is_incorrect(cit, 0.0) and not code.is_incorrect(cit, 1.0)

    # a code chain passing 60% of its training tests is a seed under the task's rule ...
    state = R.PromptState(cit, [1])
    R.absorb(code, state, [R.Attempt(chain("code", "answer"), 0.6)], R.SeedSearch(R.SPLITS["1x4"], 12, 8))
    assert len(state.seeds) == 1
    # ... and not under the old fixed threshold 0.5, now an explicit override
    state = R.PromptState(cit, [1])
    R.absorb(code, state, [R.Attempt(chain("code", "answer"), 0.6)], R.SeedSearch(R.SPLITS["1x4"], 12, 8, incorrect_threshold=0.5))
    assert not state.seeds and len(state.collected) == 1

    cfg = load_config("tiny")
    assert cfg.method.incorrect_threshold is None and resets.seed_search(cfg).incorrect_threshold is None
    assert resets.seed_search(cfg.override(**{"method.incorrect_threshold": 0.5})).incorrect_threshold == 0.5
    with pytest.raises(ConfigError, match="method.incorrect_threshold"):
        cfg.override(**{"method.incorrect_threshold": 1.0})


# ---- a localization error resets at thought 1 -----------------------------------------------------------


class FailingEngine(ScriptedEngine):
    """Localization calls raise: every call (fail_on None), or any batch holding `fail_on` in a prompt."""

    def __init__(self, *args, fail_on: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on

    def complete(self, prompts, max_tokens, sampling):
        if self.fail_on is None or any(self.fail_on in self.decode(p) for p in prompts):
            raise RuntimeError("localization engine down")
        return super().complete(prompts, max_tokens, sampling)


def run_step(engine, script=None, **over):
    cfg = load_config("tiny", {"method.method": "srpo", "method.split": "1x4", "method.localizer": "self", **over})
    items = [TaskItem(p.id, p.question, p.answer) for p in PROBLEMS.values()]
    return step.run_rollout_phases(engine, SyntheticTask(), cfg, items, step=0)


def seeds_of(result):
    return {r.item.id: r for r in result.records if r.group == "seed"}


def test_a_localization_error_falls_back_to_thought_1(caplog):
    script = {"train-0": [3], "train-1": [3], "train-2": [3]}
    with caplog.at_level(logging.WARNING, logger="srpo_core.rollouts"):
        result = run_step(FailingEngine(PROBLEMS, script, "\\boxed{2}"))
    seeds = seeds_of(result)
    assert {r.reset_index for r in seeds.values()} == {1} and {r.localization_status for r in seeds.values()} == {"error"}
    assert all(r.rollout.prefix_len == 0 for r in result.records if r.group == "shared_prefix")  # reset to the prompt
    assert result.metrics["localization/errors"] == 3 and result.metrics["localization/error_rate"] == 1.0
    assert "localization engine down" in caplog.text


def test_only_the_seed_whose_localization_fails_falls_back():
    script = {"train-0": [3], "train-1": [3], "train-2": [3]}
    result = run_step(FailingEngine(PROBLEMS, script, "\\boxed{2}", fail_on=PROBLEMS["train-1"].question))
    seeds = seeds_of(result)
    assert (seeds["train-1"].reset_index, seeds["train-1"].localization_status) == (1, "error")
    assert all((seeds[p].reset_index, seeds[p].localization_status) == (2, "boxed") for p in ("train-0", "train-2"))
    assert result.metrics["localization/errors"] == 1 and result.metrics["localization/error_rate"] == pytest.approx(1 / 3)


def test_without_errors_no_seed_is_marked_error():
    result = run_step(ScriptedEngine(PROBLEMS, {"train-0": [3], "train-1": [3], "train-2": [3]}, "\\boxed{2}"))
    assert result.metrics["localization/errors"] == 0 and {r.localization_status for r in seeds_of(result).values()} == {"boxed"}


# ---- the gradient-signal ratio of app. 14.1, by hand ---------------------------------------------------


def rec(pid: str, group: str, advantage: float, probs: list[float]) -> R.Record:
    lps = [math.log(p) if p > 0 else -1e9 for p in probs]
    n = len(probs)
    roll = Rollout([1], list(range(n)), 0, [(0, n)], lps, ["x"], "x", "answer")
    r = R.Record(roll, TaskItem(pid, "q", "0"), group, f"0:{pid}:{group}", 0.0)
    r.advantage = advantage
    return r


def hand_batch() -> list[R.Record]:
    """g_i = |A| / T * mean(1 - p) over the rollout's tokens:
    A  base: 1/2*0.5 = 0.25, 1/4*0.5 = 0.125 (A=0 excluded) -> 0.1875;  sp: 2/1*0.5 = 1.0 (A=0 excluded) -> 1.0
    B  base: 1/1*0.5 = 0.5;  sp: every A = 0 -> no signal: B is not in the both-groups subset
    C  fallback group of 8: excluded (not a base group) although it carries signal
    D  base: 1/2*1.0 = 0.5;  sp: 1/1*1.0 = 1.0, 1/2*0.5 = 0.25 -> 0.625
    both groups: A and D -> g_sp = (1.0 + 0.625) / 2 = 0.8125, g_base = (0.1875 + 0.5) / 2 = 0.34375"""
    return [
        rec("A", "base", 1.0, [0.5, 0.5]), rec("A", "base", -1.0, [0.5] * 4), rec("A", "base", 0.0, [0.1]),
        rec("A", "shared_prefix", 2.0, [0.5]), rec("A", "shared_prefix", 0.0, [0.2, 0.2]), rec("A", "seed", 0.0, [0.0] * 3),
        rec("B", "base", 1.0, [0.5]), rec("B", "shared_prefix", 0.0, [0.3]), rec("B", "shared_prefix", 0.0, [0.0]),
        rec("C", "fallback", 3.0, [0.0]), rec("C", "fallback", -1.0, [0.0, 0.0]),
        rec("D", "base", 1.0, [0.0, 0.0]), rec("D", "shared_prefix", 1.0, [0.0]), rec("D", "shared_prefix", -1.0, [0.5, 0.5]),
    ]  # fmt: skip


def test_gradient_signal_ratio_by_hand():
    m = metrics.gradient_signal_metrics(hand_batch())
    # float64 throughout; each value is a handful of exact binary fractions: 1e-12 covers rounding
    assert m["grad_signal/shared_prefix"] == pytest.approx(0.8125, abs=1e-12)
    assert m["grad_signal/base"] == pytest.approx(0.34375, abs=1e-12)
    assert m["grad_signal/ratio"] == pytest.approx(0.8125 / 0.34375, abs=1e-12)
    assert m["grad_signal/both_groups"] == 2 and m["grad_signal/both_groups_share"] == 0.5  # A, D of A, B, C, D


def test_gradient_signal_without_a_both_groups_prompt_logs_only_the_share():
    m = metrics.gradient_signal_metrics([r for r in hand_batch() if r.item.id in ("B", "C")])
    assert m == {"grad_signal/both_groups": 0.0, "grad_signal/both_groups_share": 0.0}


# ---- the localization audit ------------------------------------------------------------------------------


def test_wilson_interval_matches_published_values():
    # Wilson (1927) score interval, z = 1.96: 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634]
    assert audit.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert audit.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(x) for x in audit.wilson(0, 0))
    # the interval holds its own estimate: at k = 0 and k = n the bound meets it exactly (no rounding
    # past it, which made the audit figure's error bars negative at 0/48)
    for n in range(1, 120):
        for k in range(n + 1):
            lo, hi = audit.wilson(k, n)
            assert lo <= k / n <= hi
        assert audit.wilson(0, n)[0] == 0.0 and audit.wilson(n, n)[1] == 1.0


def test_eff5_counts_only_meaningful_thoughts_before_each_step():
    thoughts = ["a b c d e</thought>", "short</thought>", "<|im_end|> one two three four</thought>", "w1 w2 w3 w4 w5 w6</thought>", "x</thought>"]
    assert [audit.meaningful(t) for t in thoughts] == [True, False, False, True, False]
    assert audit.eff5_deviation(thoughts, 5, 2) == 2 - 1  # meaningful before step 5: 1 and 4; before step 2: 1
    assert audit.eff5_deviation(thoughts, 3, 4) == 0  # 5 thoughts apart by index, no meaningful one between


AUDIT_SCRIPT = {
    # self localizer answers \boxed{2}; the checker (the judge) finds the first wrong thought
    "train-0": [1], "train-0/suffix": ["bad", "bad", "bad", "ok"],  # judge 1: deviation +1, erroneous; 1 of 4 correct
    "train-1": [2],  # judge 2: deviation 0, clean; 4 of 4 correct
    "train-2": [4], "train-2/suffix": ["bad", "ok", "ok", "ok"],  # judge 4: deviation -2, clean; 3 of 4 correct
}  # fmt: skip


def test_live_audit_on_known_clean_and_erroneous_resets(tmp_path):
    result = run_step(ScriptedEngine(PROBLEMS, {k: list(v) for k, v in AUDIT_SCRIPT.items()}, "\\boxed{2}"))
    seeds = seeds_of(result)
    assert {p: (r.reset_index, r.judge_first_error, r.judge_status) for p, r in seeds.items()} == {"train-0": (2, 1, "checker"), "train-1": (2, 2, "checker"), "train-2": (2, 4, "checker")}
    m = result.metrics
    assert m["audit/seeds"] == 3 and m["audit/judged_share"] == 1.0
    assert m["audit/deviation_mean"] == pytest.approx(-1 / 3)
    assert m["audit/exact_agreement"] == pytest.approx(1 / 3) and m["audit/within1_agreement"] == pytest.approx(2 / 3)
    assert m["audit/eff5_deviation_mean"] == 0 and m["audit/eff5_exact_agreement"] == 1.0  # one-word synthetic thoughts
    assert {b: m[f"audit/deviation_hist/{b}"] for b in (-2, 0, 1)} == {-2: 1, 0: 1, 1: 1} and sum(m[f"audit/deviation_hist/{b}"] for b in range(-4, 5)) == 3
    assert (m["audit/clean/seeds"], m["audit/clean/suffixes"], m["audit/clean/correction_rate"], m["audit/clean/pass_at_g"]) == (2, 8, 7 / 8, 1.0)
    assert (m["audit/erroneous/seeds"], m["audit/erroneous/suffixes"], m["audit/erroneous/correction_rate"], m["audit/erroneous/pass_at_g"]) == (1, 4, 1 / 4, 1.0)
    assert (m["audit/clean/correction_rate_lo"], m["audit/clean/correction_rate_hi"]) == audit.wilson(7, 8)
    assert (m["audit/erroneous/pass_at_g_lo"], m["audit/erroneous/pass_at_g_hi"]) == audit.wilson(1, 1)
    assert m["audit/correction_ratio"] == pytest.approx(3.5)
    # the records carry the judge (rollouts.jsonl), and the audit reads them back the same
    text = records_jsonl(result.records, 0, load_config("tiny"))
    assert audit.audit_metrics(audit.read_records(text)) == audit.audit_metrics(result.records)
    png = tmp_path / "audit.png"
    assert audit.plot_audit(audit.read_records(text), png) is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_audit_off_and_without_a_checker():
    result = run_step(ScriptedEngine(PROBLEMS, {k: list(v) for k, v in AUDIT_SCRIPT.items()}, "\\boxed{2}"), **{"method.audit_judge": "none"})
    assert not any(k.startswith("audit/") for k in result.metrics) and all(r.judge_first_error is None for r in seeds_of(result).values())
    bench = get_task("numinamath_olympiads")
    assert audit.judge_kind("", bench) == "none" and audit.judge_kind("", SyntheticTask()) == "checker"
    assert audit.judge_kind("http://judge:8000", bench) == "server" and audit.judge_kind("builtin:tiny-arith", bench) == "model"
    with pytest.raises(ValueError, match="step checker"):
        audit.judge_kind("checker", bench)


def cases_and_locs():
    engine = ScriptedEngine(PROBLEMS, {})
    cases = []
    for p in PROBLEMS.values():
        seed = engine._rollout(engine.encode(f"Q:{p.question}|"), (), (), synthetic.solution_thoughts(p))
        cases.append(R.SeedCase(TaskItem(p.id, p.question, p.answer), seed.prompt_ids, seed))
    return cases, [R.Localization(2, "boxed") for _ in cases]


def test_a_model_judge_gets_the_localization_prompt_and_unparsed_replies_are_dropped():
    cases, locs = cases_and_locs()
    cfg = load_config("tiny", {"method.audit_judge": "some/judge-model"})
    judged = audit.judge_seeds(cases, locs, cfg, SyntheticTask(), seed=0, engine=ScriptedEngine(PROBLEMS, {}, "Step 1 holds.\n\\boxed{3}"))
    assert [(loc.index, loc.judge, loc.judge_status) for loc in judged] == [(2, 3, "boxed")] * 3 and all(loc.judge_tokens > 0 for loc in judged)
    dropped = audit.judge_seeds(cases, locs, cfg, SyntheticTask(), seed=0, engine=ScriptedEngine(PROBLEMS, {}, "the answer is 7"))
    assert [(loc.judge, loc.judge_status) for loc in dropped] == [(None, "unparsed")] * 3
    sampled = audit.judge_seeds(cases, locs, cfg.override(**{"method.audit_sample": 1}), SyntheticTask(), seed=0, engine=ScriptedEngine(PROBLEMS, {}, "\\boxed{1}"))
    assert sum(loc.judge is not None for loc in sampled) == 1


def test_a_failing_judge_never_fails_the_step():
    cases, locs = cases_and_locs()
    cfg = load_config("tiny", {"method.audit_judge": "some/judge-model"})
    judged = audit.judge_seeds(cases, locs, cfg, SyntheticTask(), seed=0, engine=FailingEngine(PROBLEMS, {}))
    assert [(loc.index, loc.judge, loc.judge_status) for loc in judged] == [(2, None, "error")] * 3


def test_right_answers_through_a_wrong_step_are_counted_per_group():
    """A reset after the real error can be rewarded only through another wrong step (mod-10 answers
    match by chance): the share of rewarded rollouts with a wrong step, per group and pooled."""

    def scored(pid, group, reward, steps_valid):
        r = rec(pid, group, 0.0, [0.5])
        r.reward, r.steps_valid = reward, steps_valid
        return r

    records = [
        scored("A", "base", 1.0, True), scored("A", "base", 1.0, False), scored("A", "base", 0.0, False),
        scored("A", "shared_prefix", 1.0, False), scored("A", "shared_prefix", 1.0, False), scored("A", "shared_prefix", 1.0, True),
        scored("A", "seed", 0.0, False),
    ]  # fmt: skip
    records[-1].reset_index, records[-1].localization_status = 1, "oracle"
    m = metrics.step_metrics(records, [], SyntheticTask(), {})
    assert m["steps/base/right_answer_wrong_step_share"] == 0.5  # 1 of the 2 rewarded base rollouts
    assert m["steps/shared_prefix/right_answer_wrong_step_share"] == pytest.approx(2 / 3)
    assert m["steps/right_answer_wrong_step_share"] == pytest.approx(3 / 5)
    assert "steps/seed/right_answer_wrong_step_share" not in m and "steps/fallback/right_answer_wrong_step_share" not in m
