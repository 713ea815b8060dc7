"""`srpo compare --preset fidelity`: the experiment design, the intervals and verdict rules by
hand, the report's claims on hand-made arms, then a reduced experiment end to end (3 methods,
7 arms x 2 seeds x 1 step of 4 prompts, 16 evaluation items) against a real `mlflow server`."""

from __future__ import annotations

import argparse
import math
import re
import statistics

import pytest

from srpo_core.compare import experiment as X
from srpo_core.compare import verdicts as V
from srpo_core.compare.experiment_report import SECTION_TITLES, ArmData, ExperimentData, decide_claim

# ---- the design -----------------------------------------------------------------------------------------


def test_fidelity_design_is_the_issue_s_experiment():
    """Every registered method, srpo with the self and oracle localizers, the three splits, the
    clip ablation, at least 5 seeds, one report path; planned (no training) into distinct
    trainings of equal steps whose configs carry each arm's overrides."""
    from srpo_core import methods
    from srpo_core.config import load_config

    d = X.get("fidelity")
    arms = d.all_arms()
    assert {a.method for a in arms} == set(methods.names())
    srpo = {(a.split, a.localizer, dict(a.set).get("loss.loss", "pg")) for a in arms if a.method == "srpo"}
    assert {("1x4", "self", "pg"), ("1x4", "oracle", "pg"), ("2x4", "self", "pg"), ("1x8", "self", "pg"), ("1x4", "self", "clip")} <= srpo
    assert len(d.seeds) >= 5 and d.report_path == "docs/fidelity.md" and d.preset == "fidelity"
    assert {c.rule for c in d.claims} <= set(V.RULES)
    cfg = load_config(d.preset)
    plan, planned, arm_of = X.plan_experiment(d, cfg, arms, out_dir="/tmp/unused", seeds=list(d.seeds), eval_every=d.eval_every, comparison_id="cmp")
    assert len(plan.specs) == len(arms) * len(d.seeds) and len(set(arm_of)) == len(plan.specs)
    assert len({s.out_dir for s in plan.specs}) == len(plan.specs) and len({s.steps for s in plan.specs}) == 1
    assert len(set(plan.labels)) == len(planned) and all(a.label for a in planned)
    by_key = {arm_of[s.training_id]: s for s in plan.specs if s.seed == d.seeds[0]}
    assert by_key["srpo-clip"].config["loss"]["loss"] == "clip" and by_key["srpo"].config["loss"]["loss"] == "pg"
    assert (by_key["srpo-oracle"].config["method"]["localizer"], by_key["srpo-1x8"].config["method"]["split"]) == ("oracle", "1x8")
    assert by_key["srpo"].eval_steps == [0, 4, 8, 12]  # 12 epoch steps of the preset, evaluated every 4
    # every arm at the preset's rollout budget: srppo (1 rollout per prompt) sees 8x the prompts
    assert {s.rollouts_per_step for s in plan.specs} == {cfg.train.prompts_per_step * 8}
    assert by_key["srppo"].config["train"]["prompts_per_step"] == 8 * cfg.train.prompts_per_step


def test_a_design_that_names_an_unknown_arm_or_rule_fails():
    with pytest.raises(ValueError, match="names arms \\['nope'\\]"):
        X.ExperimentDesign("x", "tiny", "t", "q", (X.Arm("grpo", "GRPO", "grpo"),), (X.Claim("c", "c", "better", ("grpo", "nope"), "accuracy"),))
    with pytest.raises(ValueError, match="unknown rule 'bigger'"):
        X.ExperimentDesign("x", "tiny", "t", "q", (X.Arm("grpo", "GRPO", "grpo"),), (X.Claim("c", "c", "bigger", ("grpo",), "accuracy"),))
    from srpo_core.config import ConfigError

    with pytest.raises(ConfigError, match="no experiment design of that name \\(designs: fidelity"):
        X.get("tiny")
    with pytest.raises(ConfigError, match="--methods: unknown \\['nope'\\]"):
        X.select_arms(X.get("fidelity"), ["nope"])
    assert [a.key for a in X.select_arms(X.get("fidelity"), ["grpo", "rrpo"])] == ["grpo", "rrpo"]


# ---- intervals by hand ------------------------------------------------------------------------------------


def test_t_quantiles_match_scipy():
    from scipy import stats

    for df in range(1, 80):
        assert V.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


def test_paired_interval_by_hand():
    # seeds x items: per-seed means 0.75, 0.5 (SD sqrt(1/32)); per-item means 0.5, 0, 1, 1 (SD sqrt(0.6875 / 3))
    iv = V.paired_interval([[1, 0, 1, 1], [0, 0, 1, 1]])
    seed_half = 12.7062047362 * math.sqrt(1 / 32) / math.sqrt(2)
    item_half = 1.959963984540054 * math.sqrt(0.6875 / 3) / 2
    assert (iv.mean, iv.seed_half, iv.item_half) == pytest.approx((0.625, seed_half, item_half))
    assert (iv.lo, iv.hi) == pytest.approx((0.625 - math.hypot(seed_half, item_half), 0.625 + math.hypot(seed_half, item_half)))
    cut = V.paired_interval([[1, 0, 1, 1], [0, 0, 1, 1]], bounds=(0.0, 1.0))
    assert (cut.lo, cut.hi) == (0.0, 1.0)
    one = V.paired_interval([[1, 0, 1, 1]])  # one seed: the items' term only
    assert one.seed_half == 0.0 and one.item_half == pytest.approx(1.959963984540054 * 0.5 / 2)
    with pytest.raises(ValueError, match="the same items"):
        V.paired_interval([[1, 0], [1]])
    assert not V.paired_interval([]).defined


def test_ratio_interval_by_hand():
    r = V.RatioInterval(20, 50, 10, 50)  # 0.4 / 0.2; se = sqrt(1/20 - 1/50 + 1/10 - 1/50) = sqrt(0.11)
    assert r.ratio == pytest.approx(2.0) and not r.corrected
    assert r.interval == pytest.approx((2 * math.exp(-1.959963984540054 * math.sqrt(0.11)), 2 * math.exp(1.959963984540054 * math.sqrt(0.11))))
    z = V.RatioInterval(0, 4, 3, 30)  # a zero count: 0.5 added to each cell -> (0.5 / 5) / (3.5 / 31)
    assert z.corrected and z.ratio == pytest.approx((0.5 / 5) / (3.5 / 31))
    assert not V.RatioInterval(0, 0, 3, 30).defined


def iv(lo, hi):
    return V.Interval((lo + hi) / 2, lo, hi, 5, 500)


def test_verdict_rules_on_hand_made_intervals():
    assert V.decide_better(iv(0.01, 0.05)).status == V.HELD
    assert V.decide_better(iv(-0.05, -0.01)).status == V.NOT_HELD
    assert V.decide_better(iv(-0.01, 0.05)).status == V.INCONCLUSIVE
    assert V.decide_equivalent(iv(-0.02, 0.025), 0.03).status == V.HELD
    assert V.decide_equivalent(iv(0.005, 0.025), 0.03).status == V.HELD  # different, but by less than the margin
    assert V.decide_equivalent(iv(0.01, 0.06), 0.03).status == V.NOT_HELD
    assert V.decide_equivalent(iv(-0.05, 0.02), 0.03).status == V.INCONCLUSIVE
    assert V.decide_best_of([iv(0.01, 0.03), iv(0.02, 0.04)]).status == V.HELD
    assert V.decide_best_of([iv(0.01, 0.03), iv(-0.02, 0.04)]).status == V.INCONCLUSIVE
    assert V.decide_best_of([iv(0.01, 0.03), iv(-0.04, -0.01)]).status == V.NOT_HELD
    assert V.decide_not_worse(iv(-0.02, 0.04), 0.03).status == V.HELD
    assert V.decide_not_worse(iv(-0.02, -0.01), 0.03).status == V.NOT_HELD  # clip significantly better
    assert V.decide_not_worse(iv(-0.05, 0.01), 0.03).status == V.INCONCLUSIVE
    # Wilson: 9/10 -> [0.5958, 0.9821] above 0.5; 1/10 -> [0.0179, 0.4042] below; 6/10 contains it
    assert V.decide_share_above(9, 10, 0.5).status == V.HELD
    assert V.decide_share_above(1, 10, 0.5).status == V.NOT_HELD
    assert V.decide_share_above(6, 10, 0.5).status == V.INCONCLUSIVE
    assert V.decide_share_above(0, 0, 0.5).status == V.INCONCLUSIVE
    band = (1.5, 3.0)
    assert V.decide_ratio_in_band(V.RatioInterval(20, 50, 10, 50), band).status == V.HELD  # 2 [1.04, 3.83]
    assert V.decide_ratio_in_band(V.RatioInterval(10, 50, 10, 50), band).status == V.INCONCLUSIVE  # 1 [0.46, 2.19]
    assert V.decide_ratio_in_band(V.RatioInterval(100, 1000, 100, 1000), band).status == V.NOT_HELD  # 1 [0.77, 1.30]: below 1.5
    assert V.decide_ratio_in_band(V.RatioInterval(400, 1000, 50, 1000), band).status == V.NOT_HELD  # 8: above 3
    assert not any(V.RULES[name].decide is None for name in V.RULES)


# ---- the claims of hand-made arms ---------------------------------------------------------------------------


def hand_arm(key, outcomes, per_step=128, ratios=(), audit=()):
    """An arm with 2 seeds, evaluated after 0, 4, 8 updates on 8 items (outcomes[seed] = the
    step-8 answers; before training every item of every seed is wrong)."""
    from srpo_core.compare.run import TrainingResult

    arm = ArmData(key, key.upper(), key)
    for seed, final in outcomes.items():
        arm.results[seed] = TrainingResult(f"t-{key}-{seed}", key.upper(), key, "1x4", "self", seed, 8, None, {}, {}, {})
        items = [f"i{j}" for j in range(len(final))]
        arm.outcomes[seed] = {0: dict.fromkeys(items, 0.0), 4: dict.fromkeys(items, 0.0), 8: dict(zip(items, map(float, final)))}
        arm.metrics[seed] = [{"step": s, "rollouts/base/count": per_step} for s in range(8)]
    for seed, step, ratio in ratios:
        arm.metrics[seed][step]["grad_signal/ratio"] = ratio
    arm.audit = list(audit)
    return arm


def claim(rule, arms, section="accuracy", **params):
    return {"key": rule, "text": rule, "rule": rule, "arms": arms, "section": section, "params": params}


def test_claims_from_hand_made_arms():
    from srpo_core.audit import AuditRow

    a = hand_arm("a", {0: [1, 1, 1, 1, 1, 1, 0, 0], 1: [1, 1, 1, 1, 1, 1, 0, 0]}, per_step=144)
    b = hand_arm("b", {0: [0] * 8, 1: [0] * 8})
    c = hand_arm("c", {0: [0, 1, 0, 0, 0, 0, 0, 0], 1: [1, 0, 0, 0, 0, 0, 0, 0]})
    data = ExperimentData({"design": {}}, "synthetic_long", {"a": a, "b": b, "c": c}, None)
    # a - b per (seed, item): 6 of 8 items +1 in both seeds: seed means equal (no seed term); item means
    # six 1s and two 0s: SD sqrt(1.5 / 7), half-width 1.96 SD / sqrt(8)
    v = decide_claim(claim("better", ["a", "b"]), data)
    half = 1.959963984540054 * math.sqrt(1.5 / 7) / math.sqrt(8)
    assert v.status == V.HELD and f"+75.0 [{100 * (0.75 - half):+.1f}, +100.0]" in v.evidence
    # c - b: seeds 0.125, 0.125; items 0.5, 0.5, 0 x 6 -> [0.125 - h, 0.125 + h] with h = 1.96 SD / sqrt(8) > 0.125
    assert decide_claim(claim("better", ["c", "b"]), data).status == V.INCONCLUSIVE
    assert decide_claim(claim("best_of", ["a", "b", "c"]), data).status == V.HELD
    assert decide_claim(claim("better", ["b", "a"]), data).status == V.NOT_HELD
    assert decide_claim(claim("better", ["a", "zzz"]), data).status == V.NOT_RUN
    # budget: a consumes 144 per step, b 128 -> the smaller final budget is 8 x 128 = 1024; a's last
    # evaluation within it is after 4 steps (576; after 8: 1152), b's after 8 (1024); a at step 4 is all wrong
    budget = decide_claim(claim("better_at_budget", ["a", "b"], "budget"), data)
    assert "≤ 1,024 rollouts (steps 4 and 8)" in budget.evidence and "+0.0 [+0.0, +0.0]" in budget.evidence and budget.status == V.INCONCLUSIVE
    g = hand_arm("g", {0: [1] * 8, 1: [1] * 8}, ratios=[(0, 0, 2.0), (0, 1, 0.5), (1, 0, 3.0), (1, 3, 1.5)])
    data.arms["g"] = g
    vg = decide_claim(claim("share_above", ["g"], "g_ratio", threshold=0.5), data)
    assert vg.status == V.INCONCLUSIVE and "g > 1 on 3 of 4" in vg.evidence  # Wilson(3, 4) = [0.30, 0.95]
    # the audit: 50 clean suffixes (10 seeds x 5), 20 correct; 50 erroneous, 10 correct -> ratio 2 [1.04, 3.83]
    clean = [AuditRow(f"c{i}", 2, 3, 0, (1.0, 1.0, 0.0, 0.0, 0.0)) for i in range(10)]
    bad = [AuditRow(f"e{i}", 5, 3, 2, (1.0, 0.0, 0.0, 0.0, 0.0)) for i in range(10)]
    data.arms["h"] = hand_arm("h", {0: [1] * 8}, audit=clean + bad)
    vh = decide_claim(claim("ratio_in_band", ["h"], "audit", band=(1.5, 3.0)), data)
    assert vh.status == V.HELD and "clean 20/50, erroneous 10/50; ratio 2.00 [1.04, 3.83]" in vh.evidence


def test_an_ablation_that_changed_nothing_is_inconclusive_not_held():
    """Two arms with the same answers on every item, seed and evaluation (a clip that never acts:
    one optimizer step per training step on fresh rollouts gives importance ratio 1) prove nothing
    about each other: `not_worse` and `better` say so instead of "held" / "inconclusive (overlap)"."""
    same = {0: [1, 0, 1, 0, 1, 1, 0, 0], 1: [0, 1, 1, 0, 1, 0, 0, 1]}
    data = ExperimentData({"design": {}}, "synthetic_long", {"a": hand_arm("a", same), "b": hand_arm("b", same)}, None)
    for rule, params in (("not_worse", {"margin": 0.03}), ("better", {})):
        v = decide_claim(claim(rule, ["a", "b"], "clip", **params), data)
        assert v.status == V.INCONCLUSIVE and "changed nothing" in v.reason and "+0.0 [+0.0, +0.0]" in v.evidence
    other = {**same, 1: [1, 1, 1, 0, 1, 0, 0, 1]}  # one item of one seed differs: judged by its interval again
    data.arms["c"] = hand_arm("c", other)
    v = decide_claim(claim("not_worse", ["c", "a"], "clip", margin=0.03), data)
    assert v.status == V.INCONCLUSIVE and "changed nothing" not in v.reason and "+6.2 [" in v.evidence  # 2 seeds: t(1) = 12.7, wide


# ---- the reduced experiment, end to end ------------------------------------------------------------------

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def reduced(mlflow_server, tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("fidelity")
    from srpo_core.compare import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = [
        "compare", "--preset", "fidelity", "--methods", "grpo", "rrpo", "srpo", "--seeds", *map(str, SEEDS), "--steps", "1", "--eval-items", "16",
        "--set", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
        "--out", str(tmp / "out"), "--report", str(tmp / "docs" / "fidelity.md"),
        "--tracking-uri", mlflow_server, "--experiment", "fidelity-test", "--quiet", "--threads", "1",
    ]  # fmt: skip
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp, mlflow_server, parser


def sections(md: str) -> dict[str, str]:
    """'## title' -> the text up to the next '## '."""
    parts = re.split(r"^## ", md, flags=re.M)
    return {p.splitlines()[0].strip(): p for p in parts[1:]}


def test_the_report_has_every_section_and_a_computed_verdict_per_claim(reduced):
    tmp, _, _ = reduced
    md = (tmp / "docs" / "fidelity.md").read_text()
    secs = sections(md)
    assert {"Claims", *SECTION_TITLES.values(), "8. Diagnostics", "9. Compute"} <= set(secs)
    design = X.get("fidelity")
    table = secs["Claims"]
    for c in design.claims:
        row = next(line for line in table.splitlines() if line.startswith(f"| {c.text} |"))
        assert re.search(r"\*\*(held|not held|inconclusive)\*\*", row), row  # every arm ran: no claim is "not run"
        # beside the figure of its section, with the same verdict
        status = re.search(r"\*\*(held|not held|inconclusive)\*\*", row).group(1)
        assert f"> **Claim: {c.text}** ({c.source}) — **{status}**" in secs[SECTION_TITLES[c.section]]
    # provenance: the command, the commit, seeds, the items, wall time
    assert "`srpo compare --preset fidelity --methods grpo rrpo srpo --seeds 0 1 --steps 1 --eval-items 16" in md
    assert re.search(r"\| commit \| `[0-9a-f]{40}(\+dirty)?` \|", md)
    assert "| seeds | 0 1 |" in md and "`synthetic_long`, 16 items" in md and re.search(r"\| wall time \| \d+ (min|s)", md)
    assert "| trainings | 14 (7 arms × 2 seeds) |" in md and "(S = 2 seeds: t = 12.706)" in md


def test_every_figure_exists_with_its_text_inside(reduced):
    import matplotlib.image as mpimg

    tmp, _, _ = reduced
    report = tmp / "docs" / "fidelity.md"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert sorted(p.split("/")[-1] for p in links) == sorted(["learning_curves.png", "accuracy_vs_rollouts.png", "split_ablation.png", "clip_ablation.png", "g_ratio.png", "correction_rates.png"])
    for rel in links:
        path = report.parent / rel
        assert path.parent == tmp / "docs" / "fidelity"
        img = mpimg.imread(path)[..., :3]
        for edge in (img[:3], img[-3:], img[:, :3], img[:, -3:]):
            assert edge.min() > 0.99, rel  # white margins: no title, legend or label cut at the border


def test_the_report_s_numbers_are_the_child_runs_and_its_verdicts_the_parent_s_tags(reduced):
    from mlflow.tracking import MlflowClient

    tmp, uri, _ = reduced
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fidelity-test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("kind") == "comparison")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["experiment"] == "fidelity" and len(children) == 14 and all(c.info.status == "FINISHED" for c in children)
    md = (tmp / "docs" / "fidelity.md").read_text()
    acc = sections(md)[SECTION_TITLES["accuracy"]]
    for label in ("GRPO", "SRPO (self)", "SRPO (self, clip)"):
        finals = [c.data.metrics["eval/synthetic_long/accuracy"] for c in children if c.data.tags["label"] == label]
        assert len(finals) == len(SEEDS)
        row = next(line for line in acc.splitlines() if line.startswith(f"| {label} |"))
        after = float(row.split("|")[4].split("[")[0])
        assert after == pytest.approx(100 * statistics.mean(finals), abs=0.051)  # one decimal in the doc
    clip = next(c for c in children if c.data.tags["label"] == "SRPO (self, clip)")
    assert clip.data.params["loss.loss"] == "clip"
    table = sections(md)["Claims"]
    for c in X.get("fidelity").claims:
        row = next(line for line in table.splitlines() if line.startswith(f"| {c.text} |"))
        assert f"**{parent.data.tags[f'claim.{c.key}']}**" in row
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")} | {a.path for a in client.list_artifacts(parent.info.run_id, "report/fidelity")}
    assert {"report/fidelity.md", "report/fidelity/g_ratio.png", "report/fidelity/correction_rates.png"} <= arts


def test_report_from_rewrites_the_same_report(reduced):
    """The report is a pure function of the comparison's files: --report-from writes it again, equal."""
    tmp, _, parser = reduced
    again = tmp / "again" / "fidelity.md"
    args = parser.parse_args(["compare", "--preset", "fidelity", "--report-from", str(tmp / "out"), "--report", str(again)])
    assert args.func(args) == 0
    assert again.read_text() == (tmp / "docs" / "fidelity.md").read_text()
    assert sorted(p.name for p in (tmp / "again" / "fidelity").iterdir()) == sorted(p.name for p in (tmp / "docs" / "fidelity").iterdir())


def test_preset_refuses_options_the_design_sets():
    from srpo_core.compare import register
    from srpo_core.config import ConfigError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for extra in (["--config", "tiny"], ["--splits", "2x4"], ["--localizers", "oracle"]):
        args = parser.parse_args(["compare", "--preset", "fidelity", *extra])
        with pytest.raises(ConfigError, match=f"{extra[0]}: not with --preset fidelity"):
            args.func(args)
