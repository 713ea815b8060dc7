"""`srpo compare`: the table logic by hand, then a reduced real comparison (3 methods x 2 seeds x
2 steps of the tiny preset) against a real `mlflow server`, checked from the child runs."""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics

import pytest

from srpo_core import compare as C

# ---- table logic, hand-computed ----------------------------------------------------------------------


def test_mean_sd_is_the_sample_sd():
    assert C.mean_sd([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert C.mean_sd([0.3]) == (0.3, None)
    m, sd = C.mean_sd([])
    assert math.isnan(m) and sd is None


def hand_table():
    rows = {
        "GRPO": {"commonsenseqa": [0.5, 0.7], "synthetic": [0.2, 0.2]},
        "RRPO": {"commonsenseqa": [0.4, 0.4], "synthetic": [0.3, 0.1]},
        "SRPO": {"commonsenseqa": [0.6, 0.6], "synthetic": [0.1, 0.5]},
    }
    return C.ResultsTable(["synthetic", "commonsenseqa"], rows, base={"synthetic": 0.15, "commonsenseqa": 0.0})


def test_results_table_markdown_by_hand():
    t = hand_table()
    # synthetic: GRPO 20.0±0.0, RRPO 20.0±14.1, SRPO 30.0±28.3 -> SRPO best
    # csqa:      GRPO 60.0±14.1, RRPO 40.0±0.0, SRPO 60.0±0.0 -> GRPO and SRPO tie, both bold
    assert t.best("synthetic") == {"SRPO"} and t.best("commonsenseqa") == {"GRPO", "SRPO"}
    lines = t.markdown().splitlines()
    assert lines[:6] == [
        "| Method | synth | csqa |",
        "|---|---:|---:|",
        "| Base | 15.0 | 0.0 |",
        "| GRPO | 20.0 ± 0.0 | **60.0 ± 14.1** |",
        "| RRPO | 20.0 ± 14.1 | 40.0 ± 0.0 |",
        "| SRPO | **30.0 ± 28.3** | **60.0 ± 0.0** |",
    ]
    assert "2 seeds" in t.markdown() and "csqa = commonsenseqa" in t.markdown()


def test_results_table_csv_by_hand():
    rows = list(csv.DictReader(io.StringIO(hand_table().csv())))
    assert [r["method"] for r in rows] == ["Base", "GRPO", "RRPO", "SRPO"]
    srpo = rows[3]
    assert float(srpo["synthetic_mean"]) == pytest.approx(30.0)
    assert float(srpo["synthetic_sd"]) == pytest.approx(100 * math.sqrt(0.08), rel=1e-5)
    assert (srpo["synthetic_best"], rows[1]["synthetic_best"], rows[2]["commonsenseqa_best"]) == ("1", "0", "0")
    assert rows[0]["synthetic_mean"] == "15" and rows[0]["synthetic_sd"] == "" and rows[1]["seeds"] == "2"


def test_one_seed_has_no_sd_and_nan_is_never_best():
    t = C.ResultsTable(["a"], {"GRPO": {"a": [0.25]}, "SRPO": {"a": []}})
    assert t.markdown().splitlines()[2:4] == ["| GRPO | **25.0** |", "| SRPO | – |"]
    assert "1 seed " in t.markdown()


def test_efficiency_table_by_hand():
    rows = {
        "GRPO": {"train_h": [1.0, 3.0], "gen_h": [1.0, 1.0], "val_h": [0.5, 0.5], "total_h": [1.5, 3.5], "tokens": [2e6, 4e6], "rollouts": [4096, 4096],
                 "resp_mean": [100, 100], "gen_tok_s": [800, 1200]},
        "SRPO": {"train_h": [3.0, 3.0], "gen_h": [1.5, 1.5], "val_h": [0.5, 0.5], "total_h": [3.5, 3.5], "tokens": [3.3e6, 3.3e6], "rollouts": [5000, 5240],
                 "resp_mean": [110, 110], "gen_tok_s": [600, 600]},
    }  # fmt: skip
    t = C.EfficiencyTable(rows)
    assert t.normalised("SRPO", "train_h") == pytest.approx(1.5) and t.normalised("SRPO", "tokens") == pytest.approx(1.1)
    assert t.normalised("SRPO", "rollouts") == pytest.approx(5120 / 4096)
    assert all(t.normalised("GRPO", c) == 1.0 for c in C.EFFICIENCY_COLUMNS)
    md = t.markdown().splitlines()
    assert "| GRPO | 2 | 1 | 0.5 | 2.5 | 3.00 M | 4096 | 100 | 1000 |" in md
    assert "| SRPO | 1.50 | 1.50 | 1.00 | 1.40 | 1.10 | 1.25 | 1.10 | 0.60 |" in md
    got = {r["method"]: r for r in csv.DictReader(io.StringIO(t.csv()))}
    assert got["GRPO"]["train_h_vs_grpo"] == "1" and float(got["SRPO"]["gen_tok_s_vs_grpo"]) == pytest.approx(0.6)
    alone = C.EfficiencyTable({"SRPO": rows["SRPO"]}, reference=None)
    assert "nothing to normalise to" in alone.markdown() and "vs_" not in alone.csv()


def test_variants_labels_and_schedule():
    vs = C.make_variants(["grpo", "rrpo", "srpo"], ["1x4"], ["self"])
    assert [C.variant_labels(vs)[v] for v in vs] == ["GRPO", "RRPO", "SRPO"]
    vs = C.make_variants(["grpo", "srpo"], ["1x4", "2x4"], ["self", "oracle"])
    assert [C.variant_labels(vs)[v] for v in vs] == ["GRPO", "SRPO (1×4, self)", "SRPO (1×4, oracle)", "SRPO (2×4, self)", "SRPO (2×4, oracle)"]
    with pytest.raises(ValueError, match="random resets are rrpo"):
        C.make_variants(["srpo"], ["1x4"], ["random"])
    assert C.eval_schedule(5, 0) == [0, 5] and C.eval_schedule(5, 2) == [0, 2, 4, 5] and C.eval_schedule(0, 3) == [0]


def curve_results(seeds):
    from srpo_core.compare.run import TrainingResult

    out = []
    for label, gain in (("GRPO", 0.02), ("RRPO", 0.03), ("SRPO (1×4, oracle)", 0.08), ("SRPO (1×4, self)", 0.05)):
        for seed in seeds:
            curves = {b: [[s, 0.3 + gain * s + 0.01 * seed] for s in range(4)] for b in ("synthetic", "commonsenseqa", "numinamath_olympiads")}
            out.append(TrainingResult(f"t-{label}-{seed}", label, "x", "1x4", "self", seed, 3, None, curves, dict.fromkeys(curves, 200), {}))
    return out


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)], ids=["one-seed", "three-seeds"])
def test_learning_curves_keep_their_text_inside_and_show_intervals(tmp_path, seeds):
    """The saved PNG has a blank margin on every side (nothing is cut at the edges: the old plot
    put its legend below the figure's bottom), and each method has its interval band."""
    import matplotlib.image as mpimg

    results = curve_results(seeds)
    labels = list(dict.fromkeys(r.label for r in results))
    path = C.plot_learning_curves(labels, ["synthetic", "commonsenseqa", "numinamath_olympiads"], results, tmp_path / "curves.png")
    img = mpimg.imread(path)[..., :3]  # [H, W, 3] floats in 0..1
    for edge in (img[:4], img[-4:], img[:, :4], img[:, -4:]):
        assert edge.min() > 0.99  # white: no text or line reaches the border
    # one seed: the Wilson 95% band over the 200 items; several: mean ± SD over seeds
    from srpo_core.audit import wilson
    from srpo_core.compare.report import _curve_band

    m, lo, hi = _curve_band([30.0], 200)
    assert lo < m < hi and (lo, hi) == pytest.approx(tuple(100 * x for x in wilson(60, 200)))
    assert _curve_band([30.0, 32.0], 200) == pytest.approx((31.0, 31.0 - 2**0.5, 31.0 + 2**0.5))


# ---- pass@k and the rollout budget ---------------------------------------------------------------------


def test_default_k_grid():
    from srpo_core.compare.plan import check_ks
    from srpo_core.config import load_config

    assert C.default_ks(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert C.default_ks(10) == [1, 2, 4, 8, 10] and C.default_ks(2) == [1, 2] and C.default_ks(1) == []
    assert check_ks([4, 1, 4], 8) == [1, 4]  # asked: sorted, no repeats, no default added
    with pytest.raises(ValueError, match=r"1\.\.samples \(8\); got \[9\]"):
        check_ks([1, 9], 8)
    plan = C.plan_comparison(load_config("tiny"), methods=["grpo"], seeds=[0], samples=128)
    assert plan.specs[0].ks == [1, 2, 4, 8, 16, 32, 64, 128] and plan.specs[0].samples == 128
    assert C.plan_comparison(load_config("tiny"), methods=["grpo"], seeds=[0]).specs[0].ks == []  # one sample: greedy accuracy only


def test_pass_at_k_estimator_is_monotone_in_k():
    """The unbiased estimator 1 - C(n-c, k) / C(n, k): pass@1 = c / n, pass@n = [c > 0], and
    non-decreasing in k for every (n, c), so a mean over items (and seeds) is too."""
    from math import comb

    from srpo_core.evaluate import pass_at_k

    for n in range(1, 17):
        for c in range(n + 1):
            curve = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert curve[0] == pytest.approx(c / n) and curve[-1] == pytest.approx(float(c > 0))
            assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
            assert curve == pytest.approx([1 - comb(n - c, k) / comb(n, k) for k in range(1, n + 1)])


def test_equal_budget_planning():
    """At the tiny preset's split 1x4 (16 prompts x 8 rollouts), srppo (1 rollout per prompt) gets
    8x grpo's prompts, mini-batch and training set, and the same steps; --budget config keeps
    every method's config."""
    from srpo_core.config import load_config

    cfg = load_config("tiny")
    assert cfg.method.split == "1x4"
    plan = C.plan_comparison(cfg, methods=["grpo", "srpo", "srppo"], seeds=[0, 1])
    by = {s.method: s for s in plan.specs if s.seed == 0}
    assert {m: (s.config["train"]["prompts_per_step"], s.rollouts_per_prompt, s.rollouts_per_step) for m, s in by.items()} == {
        "grpo": (16, 8, 128), "srpo": (16, 8, 128), "srppo": (128, 1, 128),
    }  # fmt: skip
    assert by["srppo"].config["train"]["mini_batch_prompts"] == 8 * by["grpo"].config["train"]["mini_batch_prompts"] == 64
    assert by["srppo"].config["data"]["train_size"] == 8 * by["grpo"].config["data"]["train_size"] == 384
    assert len({s.steps for s in plan.specs}) == 1 and plan.reference_rollouts == 128 and plan.budget == "equal"
    assert "  SR-PPO: 128 prompts x 1 rollouts = 128 per step, 6 steps" in plan.budget_lines()
    kept = C.plan_comparison(cfg, methods=["grpo", "srppo"], seeds=[0], budget="config")
    assert {s.method: (s.config["train"]["prompts_per_step"], s.rollouts_per_step) for s in kept.specs} == {"grpo": (16, 128), "srppo": (16, 16)}
    assert kept.specs[1].config["data"]["train_size"] == 48
    # from the srppo preset (128 x 1): grpo comes down to 16 prompts; srppo keeps its options
    plan = C.plan_comparison(load_config("srppo"), methods=["grpo", "srppo"], seeds=[0])
    by = {s.method: s for s in plan.specs}
    assert by["grpo"].config["train"]["prompts_per_step"] == 16 and by["grpo"].config["method"]["options"] == {}
    assert by["srppo"].config["method"]["options"]["rollouts"] == 1 and by["srppo"].rollouts_per_step == by["grpo"].rollouts_per_step == 128


def test_equal_budget_errors_name_the_keys():
    from srpo_core.config import load_config

    odd = load_config("srppo").override(**{"method.options.rollouts": 3, "train.prompts_per_step": 4, "train.mini_batch_prompts": 4, "data.train_size": 24})
    with pytest.raises(ValueError, match=r"'grpo' samples 8 rollouts per prompt, which does not divide .* 12 rollouts per step"):
        C.plan_comparison(odd, methods=["grpo", "srppo"], seeds=[0])
    plan = C.plan_comparison(odd, methods=["grpo", "srppo"], seeds=[0], budget="config")  # as configured: no scaling asked
    assert [s.rollouts_per_step for s in plan.specs] == [32, 12]
    with pytest.raises(ValueError, match="budget 'same': one of"):
        C.plan_comparison(odd, methods=["srppo"], seeds=[0], budget="same")


def passk_results(seeds):
    """GRPO / SR-PPO results with pass@k at k = 1, 2, 4 on one benchmark (40 items)."""
    from srpo_core.compare.run import TrainingResult

    out = []
    for label, base in (("GRPO", 0.30), ("SR-PPO", 0.35)):
        for i, seed in enumerate(seeds):
            pk = {"1": base + 0.01 * i, "2": base + 0.1 + 0.02 * i, "4": base + 0.2 + 0.04 * i}
            curves = {"synthetic": [[0, 0.2], [3, base]]}
            r = TrainingResult(f"t-{label}-{seed}", label, "x", "none", "none", seed, 3, None, curves, {"synthetic": 40}, {"synthetic": pk})
            r.base_pass_at = {"synthetic": {"1": 0.2, "2": 0.3, "4": 0.4}}
            out.append(r)
    return out


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)], ids=["one-seed", "three-seeds"])
def test_passk_table_and_figure(tmp_path, seeds):
    import matplotlib.image as mpimg
    from scipy.stats import t

    from srpo_core.audit import wilson

    results = passk_results(seeds)
    table = C.passk_table(["GRPO", "SR-PPO"], ["synthetic"], results)
    assert table.ks == [1, 2, 4] and table.labels() == ["Base", "GRPO", "SR-PPO"]
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert list(rows[0]) == ["benchmark", "method", "k", "seeds", "items", "mean", "ci_low", "ci_high", "interval"]
    assert len(rows) == 3 * 3
    got = {(r["method"], int(r["k"])): r for r in rows}
    for (lab, k), r in got.items():
        assert float(r["ci_low"]) < float(r["mean"]) < float(r["ci_high"])  # an interval around every mean
    # Base: one evaluation of the untrained model, the Wilson interval over the 40 items
    assert (float(got["Base", 4]["ci_low"]), float(got["Base", 4]["ci_high"])) == pytest.approx(tuple(100 * x for x in wilson(0.4 * 40, 40)), rel=1e-5)
    r = got["SR-PPO", 4]
    vals = [0.55 + 0.04 * i for i in range(len(seeds))]
    if len(seeds) == 1:
        assert r["interval"] == "Wilson 95% over items" and r["seeds"] == "1"
        assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx(tuple(100 * x for x in wilson(0.55 * 40, 40)), rel=1e-5)
    else:  # mean ± t_{0.975, 2} SD / sqrt(3) over the seeds
        m, half = statistics.mean(vals), t.ppf(0.975, 2) * statistics.stdev(vals) / math.sqrt(3)
        assert r["interval"] == "t95 over seeds" and r["seeds"] == "3"
        assert (float(r["mean"]), float(r["ci_low"]), float(r["ci_high"])) == pytest.approx((100 * m, 100 * (m - half), 100 * (m + half)), rel=1e-5)
    md = table.markdown()
    assert "| Method | pass@1 | pass@2 | pass@4 |" in md and md.count("| SR-PPO |") == 1 and "[95% interval" in md
    path = C.plot_passk_curves(table, tmp_path / "passk_curves.png")
    img = mpimg.imread(path)[..., :3]
    for edge in (img[:4], img[-4:], img[:, :4], img[:, -4:]):
        assert edge.min() > 0.99  # every text inside the figure
    assert C.passk_table(["GRPO"], ["synthetic"], curve_results((0,))[:1]) is None  # no pass@k asked: no table


# ---- a reduced real comparison -----------------------------------------------------------------------

SEEDS = (0, 1)
STEPS = 2


def run_compare(flags: list[str], out, tracking_uri: str, experiment: str) -> str:
    """`srpo compare` of the tiny preset with `flags`, written to `out` and tracked under
    `experiment`, on one torch thread (fastest for the tiny model on a shared machine); it must
    succeed. Returns what it printed."""
    import contextlib

    import torch

    parser = argparse.ArgumentParser()
    C.register(parser.add_subparsers())
    args = parser.parse_args(["compare", "--config", "tiny", *flags, "--out", str(out), "--tracking-uri", tracking_uri, "--experiment", experiment, "--quiet"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


@pytest.fixture(scope="module")
def comparison(mlflow_server, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    run_compare([
        "--methods", "grpo", "rrpo", "srpo", "--seeds", *map(str, SEEDS), "--steps", str(STEPS),
        "--benchmarks", "commonsenseqa:12", "--eval-every", "1",
        "--set", f"model.name_or_path={tiny_model_path}", "train.prompts_per_step=8", "train.mini_batch_prompts=8",
        "data.train_size=16", "eval.items_per_benchmark=30",
    ], out, mlflow_server, "compare-test")  # fmt: skip
    return out, mlflow_server


def runs_of(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("compare-test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kind") == "comparison"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_mlflow_parent_and_children(comparison):
    out, uri = comparison
    client, parent, children = runs_of(uri)
    cid = parent.data.tags["comparison_id"]
    assert parent.info.status == "FINISHED" and len(children) == 6
    assert sorted((c.data.tags["method"], c.data.tags["seed"]) for c in children) == sorted((m, str(s)) for m in ("grpo", "rrpo", "srpo") for s in SEEDS)
    for c in children:
        t = c.data.tags
        assert c.info.status == "FINISHED" and t["comparison_id"] == cid and t["training_id"].startswith(cid)
        assert (t["split"], t["localizer"]) == {"grpo": ("none", "none"), "rrpo": ("1x4", "random"), "srpo": ("1x4", "self")}[t["method"]]
        assert c.data.params["method.method"] == t["method"] and c.data.params["train.seed"] == t["seed"]
        for b in ("synthetic", "commonsenseqa"):
            hist = client.get_metric_history(c.info.run_id, f"eval/{b}/accuracy")
            assert sorted(m.step for m in hist) == list(range(STEPS + 1))
        assert c.data.metrics["eval/commonsenseqa/n"] == 12 and c.data.metrics["eval/synthetic/n"] == 30
        assert c.data.metrics["eval/commonsenseqa/truncated"] == 12  # the tiny preset's 64-token prompts
        assert "time/step" in c.data.metrics and "efficiency/train_h" in c.data.metrics
        assert (c.data.params["rollouts_per_step"], c.data.params["rollouts_per_prompt"]) == ("64", "8")  # 8 prompts x 8, every method
    arts = {f.path for f in client.list_artifacts(parent.info.run_id, "tables")} | {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"tables/results.md", "tables/results.csv", "tables/efficiency.md", "tables/efficiency.csv", "figures/learning_curves.png", "figures/accuracy_vs_rollouts.png"} <= arts
    assert not any("passk" in a for a in arts)  # one sample per item: no pass@k
    outcomes = {f.path for f in client.list_artifacts(children[0].info.run_id, f"eval/step_{STEPS:06d}")}
    assert f"eval/step_{STEPS:06d}/outcomes.csv" in outcomes


def test_results_table_matches_the_child_runs(comparison):
    out, uri = comparison
    _, _, children = runs_of(uri)
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "results.csv").read_text()))}
    assert list(rows) == ["Base", "GRPO", "RRPO", "SRPO"]
    md = (out / "results.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| Method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["Method", "synth", "csqa"]
    for b, short in (("synthetic", "synth"), ("commonsenseqa", "csqa")):
        means = {}
        for label, method in (("GRPO", "grpo"), ("RRPO", "rrpo"), ("SRPO", "srpo")):
            finals = [100 * c.data.metrics[f"eval/{b}/accuracy"] for c in children if c.data.tags["method"] == method]
            assert len(finals) == len(SEEDS)
            means[label] = statistics.mean(finals)
            assert float(rows[label][f"{b}_mean"]) == pytest.approx(means[label], abs=1e-4)
            assert float(rows[label][f"{b}_sd"]) == pytest.approx(statistics.stdev(finals), abs=1e-4)
            cell = next(line for line in md if line.startswith(f"| {label} |")).strip("|").split("|")[cols.index(short)].strip()
            assert cell.strip("*") == f"{means[label]:.1f} ± {statistics.stdev(finals):.1f}"
            assert (cell.startswith("**") and cell.endswith("**")) == (rows[label][f"{b}_best"] == "1")
        top = max(means.values())
        assert {lab for lab, m in means.items() if rows[lab][f"{b}_best"] == "1"} == {lab for lab, m in means.items() if math.isclose(m, top, abs_tol=1e-9)}
    client, _, _ = runs_of(uri)
    step0 = [100 * m.value for c in children for m in client.get_metric_history(c.info.run_id, "eval/synthetic/accuracy") if m.step == 0]
    assert len(set(step0)) == 1  # the base model, seed-invariant (LoRA starts at zero, greedy decoding)
    assert float(rows["Base"]["synthetic_mean"]) == pytest.approx(step0[0], abs=1e-4) and rows["Base"]["synthetic_sd"] == ""


def test_efficiency_table_matches_the_child_runs(comparison):
    out, uri = comparison
    _, _, children = runs_of(uri)
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "efficiency.csv").read_text()))}
    assert list(rows) == ["GRPO", "RRPO", "SRPO"]
    for col in C.EFFICIENCY_COLUMNS:
        assert float(rows["GRPO"][f"{col}_vs_grpo"]) == pytest.approx(1.0)
        vals = {}
        for label, method in (("GRPO", "grpo"), ("RRPO", "rrpo"), ("SRPO", "srpo")):
            vals[label] = statistics.mean(c.data.metrics[f"efficiency/{col}"] for c in children if c.data.tags["method"] == method)
            assert float(rows[label][col]) == pytest.approx(vals[label], rel=1e-5)
        for label in ("RRPO", "SRPO"):
            assert float(rows[label][f"{col}_vs_grpo"]) == pytest.approx(vals[label] / vals["GRPO"], rel=1e-4)
    assert all(float(rows[lab]["tokens"]) > 0 and float(rows[lab]["gen_tok_s"]) > 0 for lab in rows)
    md = (out / "efficiency.md").read_text()
    assert "| GRPO | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 |" in md


def test_learning_curves_png(comparison):
    out, _ = comparison
    png = out / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the synthetic task has a step checker: the audit judges every seed of rrpo and srpo
    audits = sorted(p.name for p in out.glob("audit_*.png"))
    assert audits == ["audit_rrpo.png", "audit_srpo.png"]
    assert (out / "runs.jsonl").read_text().count("\n") == 6


def test_comparison_experiment_opens_in_the_training_view(comparison):
    from srpo_core.tracking import EXPERIMENT_KIND_TAG

    client, parent, _ = runs_of(comparison[1])
    assert client.get_experiment(parent.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/learning_curves.png", "figures/accuracy_vs_rollouts.png", "figures/audit_rrpo.png", "figures/audit_srpo.png"}


# ---- a reduced real comparison at equal budget with pass@k (1 step, 1 seed, 4 samples) -----------------

BUDGET = 16  # tiny at 2 prompts x 8 rollouts: grpo/srpo 2 prompts, srppo 16


@pytest.fixture(scope="module")
def passk_comparison(mlflow_server, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_passk")
    printed = run_compare([
        "--methods", "grpo", "srpo", "srppo", "--seeds", "0", "--steps", "1", "--eval-every", "0",
        "--samples", "4", "--eval-items", "8",
        "--set", f"model.name_or_path={tiny_model_path}", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "data.train_size=4",
    ], out, mlflow_server, "compare-passk-test")  # fmt: skip
    return out, mlflow_server, printed


def test_equal_budget_run_records_and_consumes_it(passk_comparison):
    """Every method samples 16 rollouts per step (printed, in runs.jsonl, in the child params);
    the efficiency table's `rollouts` is what the trainings really sampled, counted from their
    rollout records and the seed search's dropped chains."""
    import json

    from mlflow.tracking import MlflowClient

    out, uri, printed = passk_comparison
    assert "rollout budget (equal): 16 rollouts per step for every method" in printed
    assert "  SR-PPO: 16 prompts x 1 rollouts = 16 per step, 1 steps" in printed and "  GRPO: 2 prompts x 8 rollouts = 16 per step, 1 steps" in printed
    runs = {r["method"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert {m: (r["prompts_per_step"], r["rollouts_per_prompt"], r["rollouts_per_step"]) for m, r in runs.items()} == {"grpo": (2, 8, BUDGET), "srpo": (2, 8, BUDGET), "srppo": (16, 1, BUDGET)}
    eff = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "efficiency.csv").read_text()))}
    label = {"grpo": "GRPO", "srpo": "SRPO", "srppo": "SR-PPO"}
    for m, r in runs.items():
        tdir = out / "trainings" / r["training_id"]
        records = [json.loads(line) for f in tdir.glob("steps/*/rollouts.jsonl") for line in f.read_text().splitlines()]
        metrics = [json.loads(line) for line in (tdir / "metrics.jsonl").read_text().splitlines()]
        consumed = len(records) + sum(int(s.get("rollouts/dropped/count", 0)) for s in metrics)
        assert r["rollouts_consumed"] == consumed == sum(s["rollouts/consumed"] for s in metrics)
        assert float(eff[label[m]]["rollouts"]) == consumed and r["rollouts_at"] == [[0, 0], [1, consumed]]
    assert runs["grpo"]["rollouts_consumed"] == runs["srppo"]["rollouts_consumed"] == BUDGET  # iid sampling: exactly the budget
    assert runs["srpo"]["rollouts_consumed"] >= BUDGET  # + its seeds (not trained) and the chains the seed search dropped
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("compare-passk-test")
    children = [c for c in client.search_runs([exp.experiment_id]) if c.data.tags.get("kind") != "comparison"]
    assert {c.data.tags["method"]: (c.data.params["rollouts_per_step"], c.data.params["train.prompts_per_step"]) for c in children} == {
        "grpo": ("16", "2"), "srpo": ("16", "2"), "srppo": ("16", "16"),
    }  # fmt: skip


def test_passk_outputs_of_a_real_run(passk_comparison):
    """--samples 4 without --pass-k: k = 1, 2, 4; passk.csv per method and k with an interval,
    each curve non-decreasing in k, Base = the step-0 pass@k of the child runs; table and figure
    in the parent run."""
    import matplotlib.image as mpimg
    from mlflow.tracking import MlflowClient

    out, uri, printed = passk_comparison
    assert "pass@k for k = 1 2 4 of 4 samples" in printed
    rows = list(csv.DictReader(io.StringIO((out / "passk.csv").read_text())))
    assert {r["method"] for r in rows} == {"Base", "GRPO", "SRPO", "SR-PPO"} and {r["k"] for r in rows} == {"1", "2", "4"}
    for lab in ("Base", "GRPO", "SRPO", "SR-PPO"):
        curve = sorted((int(r["k"]), r) for r in rows if r["method"] == lab)
        means = [float(r["mean"]) for _, r in curve]
        assert all(b >= a - 1e-9 for a, b in zip(means, means[1:])), (lab, means)
        for _, r in curve:
            assert r["interval"] == "Wilson 95% over items" and r["items"] == "8"
            assert 0.0 <= float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) <= 100.0 and float(r["ci_high"]) > float(r["ci_low"])
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("compare-passk-test")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "comparison")
    child = next(r for r in runs if r.data.tags.get("method") == "srppo")
    base = {r["k"]: float(r["mean"]) for r in rows if r["method"] == "Base"}
    for k in ("1", "2", "4"):
        step0 = [m.value for m in client.get_metric_history(child.info.run_id, f"eval/synthetic/pass_at_{k}") if m.step == 0]
        assert base[k] == pytest.approx(100 * step0[0], abs=1e-3)
    arts = {f.path for d in ("tables", "figures") for f in client.list_artifacts(parent.info.run_id, d)}
    assert {"tables/passk.md", "tables/passk.csv", "figures/passk_curves.png", "figures/accuracy_vs_rollouts.png"} <= arts
    assert parent.data.params["compare.budget"] == "equal" and parent.data.params["compare.pass_k"] == "[1, 2, 4]"
    img = mpimg.imread(out / "passk_curves.png")[..., :3]
    for edge in (img[:4], img[-4:], img[:, :4], img[:, -4:]):
        assert edge.min() > 0.99


@pytest.mark.parametrize("extra", [[], ["--preset", "fidelity"]])
@pytest.mark.parametrize("flags, message", [(["--samples", "2", "--pass-k", "3"], r"--pass-k \[3\]: each k must be in 1..--samples \(2\)"), (["--samples", "0"], "--samples 0: must be >= 1")])
def test_bad_pass_k_flags_are_refused_before_any_training(tmp_path, extra, flags, message):
    from srpo_core.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["compare", *extra, *flags, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
