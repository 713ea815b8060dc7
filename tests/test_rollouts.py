"""Algorithm 2 bookkeeping (seed search, base groups, fallbacks, resets) with a scripted engine."""


import pytest

from srpo_core import rollouts as R
from srpo_core import step
from srpo_core.config import load_config
from srpo_core.tasks import SyntheticTask, TaskItem, synthetic
from tests.scripted_engine import ScriptedEngine

PROBLEMS = {p.id: p for p in synthetic.make_split("train", 3, seed=0)}


def run(script, method="srpo", split="1x4", localizer="oracle", answer="\\boxed{2}"):
    cfg = load_config("tiny", {"method.method": method, "method.split": split, "method.localizer": localizer if method != "grpo" else ""})
    engine = ScriptedEngine(PROBLEMS, script, answer)
    items = [TaskItem(p.id, p.question, p.answer) for p in PROBLEMS.values()]
    result = step.run_rollout_phases(engine, SyntheticTask(), cfg, items, step=0)
    return engine, result


def groups_of(result, pid):
    out = {}
    for r in result.records:
        if r.item.id == pid:
            out.setdefault(r.group, []).append(r)
    return out


def test_seed_is_first_incorrect_and_base_is_filled():
    pid = "train-0"
    engine, result = run({pid: ["ok", 3, "ok", 2], "train-1": [], "train-2": []})
    g = groups_of(result, pid)
    assert len(g["seed"]) == 1
    assert g["seed"][0].oracle_first_error == 3  # the first incorrect chain, not the later one
    assert len(g["base"]) == 4 and len(g["shared_prefix"]) == 4
    # the later wrong chain (first error 2) joined the base group, the seed did not
    assert sorted(r.reward for r in g["base"]) == [0.0, 1.0, 1.0, 1.0]
    assert all(r.reset_index == 3 for r in g["shared_prefix"])


def test_no_seed_falls_back_to_one_group_of_eight():
    engine, result = run({"train-0": [], "train-1": [], "train-2": []})
    for pid in PROBLEMS:
        g = groups_of(result, pid)
        assert set(g) == {"fallback"} and len(g["fallback"]) == 8
        assert len({r.group_id for r in g["fallback"]}) == 1
    # budget: 12 attempts searched, then 4 collected + 4 fresh
    assert result.metrics["seed_search/attempts_mean"] == 12
    assert result.metrics["rollouts/dropped/count"] == 3 * 8


def test_extra_chains_during_search_are_dropped_and_counted():
    # seed only at attempt 7. Round 1 samples 5 (seed + G): 4 kept, 1 dropped. Round 2 samples
    # G=4 (attempts 6-9): 6, 8 and 9 are correct and dropped, 7 is the seed.
    engine, result = run({"train-0": ["ok"] * 6 + [2], "train-1": [1], "train-2": [1]})
    g = groups_of(result, "train-0")
    assert len(g["base"]) == 4 and g["seed"][0].oracle_first_error == 2
    assert result.metrics["rollouts/dropped/count"] == 4
    assert [n for call in engine.calls for _, n in call][:4] == [5, 5, 5, 4]


def test_shared_prefix_is_token_identical_to_seed_thoughts():
    engine, result = run({"train-0": [4], "train-1": [2], "train-2": [1]})
    for pid in PROBLEMS:
        g = groups_of(result, pid)
        seed = g["seed"][0]
        h = seed.reset_index
        end = seed.rollout.spans[h - 2][1] if h > 1 else 0
        for r in g["shared_prefix"]:
            assert r.rollout.prefix_len == end
            assert r.rollout.response_ids[:end] == seed.rollout.response_ids[:end]
            assert r.rollout.spans[: h - 1] == seed.rollout.spans[: h - 1]
            assert r.rollout.thoughts[: h - 1] == seed.rollout.thoughts[: h - 1]


def test_oracle_reset_equals_first_wrong_thought():
    engine, result = run({"train-0": [4], "train-1": [2], "train-2": [1]})
    for pid, k in (("train-0", 4), ("train-1", 2), ("train-2", 1)):
        seed = groups_of(result, pid)["seed"][0]
        assert seed.reset_index == k == synthetic.first_error(PROBLEMS[pid], seed.rollout.thoughts)
        assert seed.localization_status == "oracle"
    assert result.metrics["localization/oracle_agreement"] == 1.0
    assert "localization/parse_rate" not in result.metrics  # only the policy's own answers are parsed


def test_oracle_agreement_counts_a_chain_that_stopped_early():
    """2 right thoughts and no answer: wrong at the missing third; the oracle resets at the second
    (the last it has) and agrees with itself."""
    engine, result = run({"train-0": [("cut", 2)], "train-1": [2], "train-2": [1]})
    seed = groups_of(result, "train-0")["seed"][0]
    assert seed.oracle_first_error == 3 and len(seed.rollout.spans) == 2 and seed.reset_index == 2
    assert result.metrics["localization/oracle_agreement"] == 1.0


def test_grpo_is_one_group_of_eight_iid():
    engine, result = run({"train-0": [1, 2], "train-1": [], "train-2": []}, method="grpo")
    g = groups_of(result, "train-0")
    assert set(g) == {"base"} and len(g["base"]) == 8
    assert all(n == 8 for call in engine.calls for _, n in call)


@pytest.mark.parametrize("split,n_sp,n_base", [("2x4", 2, 0), ("1x8", 1, 0)])
def test_other_splits(split, n_sp, n_base):
    engine, result = run({"train-0": [2, "ok", 3], "train-1": [1, 1], "train-2": [2, 2]}, split=split)
    g = groups_of(result, "train-0")
    assert len({r.group_id for r in g["shared_prefix"]}) == n_sp
    assert len(g.get("base", [])) == n_base
    assert sum(1 for r in result.records if r.item.id == "train-0" and r.trainable) == 8


def test_two_by_four_with_one_seed_gives_base_group():
    engine, result = run({"train-0": [2] + ["ok"] * 11, "train-1": [1, 1], "train-2": [1, 1]}, split="2x4")
    g = groups_of(result, "train-0")
    assert len(g["seed"]) == 1 and len(g["shared_prefix"]) == 4 and len(g["base"]) == 4


def test_self_localizer_parses_policy_answer():
    engine, result = run({"train-0": [3], "train-1": [3], "train-2": [3]}, localizer="self", answer="Step 1 looks fine.\n\\boxed{2}")
    seeds = [r for r in result.records if r.group == "seed"]
    assert all(r.reset_index == 2 and r.localization_status == "boxed" for r in seeds)
    assert result.metrics["localization/parse_rate"] == 1.0
    assert result.metrics["localization/oracle_agreement"] == 0.0


@pytest.mark.parametrize("text,n,expected", [
    ("\\boxed{3}", 5, (3, "boxed")),
    ("\\boxed{0}", 5, (1, "boxed")),
    ("I think Step 2 then \\boxed{9}", 5, (2, "step")),  # out of range boxed -> last Step k
    ("\\boxed{\\text{4}}", 5, (1, "fallback")),
    ("no answer", 5, (1, "fallback")),
    ("\\boxed{2} and later \\boxed{4}", 5, (4, "boxed")),
    ("\\boxed{ 5 }", 5, (5, "boxed")),
    ("Step 7 and Step 3", 5, (3, "step")),
])
def test_parse_localization(text, n, expected):
    assert R.parse_localization(text, n) == expected


def test_random_localizer_is_seeded_and_in_range():
    engine = ScriptedEngine(PROBLEMS, {})
    p = PROBLEMS["train-0"]
    seed = engine._rollout(engine.encode(f"Q:{p.question}|"), (), (), synthetic.solution_thoughts(p))
    cases = [R.SeedCase(TaskItem(p.id, p.question, p.answer), seed.prompt_ids, seed)] * 50
    ctx = R.LocalizeContext(engine, SyntheticTask(), "tiny_localization_v1", 0.0, 8, False, seed=7)
    a = [l.index for l in R.random_localizer(cases, ctx)]
    assert a == [l.index for l in R.random_localizer(cases, ctx)]
    assert set(a) <= set(range(1, len(seed.spans) + 1)) and len(set(a)) > 2


def test_advantages_per_group_and_seed_untrained():
    engine, result = run({"train-0": ["ok", 3, 2], "train-1": [], "train-2": []})
    g = groups_of(result, "train-0")
    assert g["seed"][0].advantage == 0.0 and not g["seed"][0].trainable
    base_adv = sorted(r.advantage for r in g["base"])
    assert base_adv == pytest.approx([-3 ** 0.5, 1 / 3 ** 0.5, 1 / 3 ** 0.5, 1 / 3 ** 0.5])
    assert all(r.advantage == 0.0 for r in g["shared_prefix"])  # all suffixes correct: flat group
    assert result.metrics["groups/shared_prefix/zero_adv_share"] == 1.0


def test_shared_prefix_advantages_with_mixed_suffix_rewards():
    """One of the 4 suffixes from the reset is right: it gets sqrt(3), the three wrong ones
    -1/sqrt(3) (mean 1/4, population std sqrt(3)/4), in their own group apart from the base."""
    engine, result = run({"train-0": ["ok", 3, 2], "train-0/suffix": ["bad", "ok", "bad", "bad"], "train-1": [], "train-2": []})
    g = groups_of(result, "train-0")
    sp = g["shared_prefix"]
    assert [r.reward for r in sp] == [0.0, 1.0, 0.0, 0.0] and len({r.group_id for r in sp}) == 1
    assert [r.advantage for r in sp] == pytest.approx([-1 / 3 ** 0.5, 3 ** 0.5, -1 / 3 ** 0.5, -1 / 3 ** 0.5])
    assert sorted(r.advantage for r in g["base"]) == pytest.approx([-3 ** 0.5, 1 / 3 ** 0.5, 1 / 3 ** 0.5, 1 / 3 ** 0.5])
    assert result.metrics["groups/shared_prefix/zero_adv_share"] == 0.0
