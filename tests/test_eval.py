"""Evaluation: pass@k, greedy vs sampled passes, long-prompt policies, benchmark-backed tasks,
and evaluate_suite's MLflow logging (real `mlflow server`)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import pytest

from srpo_core.config import load_config
from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, TokenScores
from srpo_core.evaluate import TRUNCATION_MARK, evaluate, evaluate_suite, fit_prompt, middle_cut, pass_at_k
from srpo_core.tasks import TASKS, SyntheticTask, TaskItem, get_task


class CharEngine(RolloutEngine):
    """One token per character; the response is ``answer(prompt_text, sample_index, temperature)``."""

    def __init__(self, answer: Callable[[str, int, float], str]):
        self.answer = answer
        self.requests: list[tuple[int, float]] = []  # (n, temperature) per request
        self.samplings: list[SamplingParams] = []  # per generate_thoughts call

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def generate_thoughts(self, requests, limits, sampling):
        self.samplings.append(sampling)
        out = []
        for req in requests:
            self.requests.append((req.n, sampling.temperature))
            prompt = self.decode(list(req.prompt_ids))
            chains = []
            for j in range(req.n):
                text = self.answer(prompt, j, sampling.temperature)
                ids = self.encode(text)
                chains.append(Rollout(list(req.prompt_ids), ids, 0, [(0, len(ids))], [0.0] * len(ids), [text], text, "answer"))
            out.append(chains)
        return out

    def complete(self, prompts, max_tokens, sampling):
        return [Completion([], "", [], "eos") for _ in prompts]

    def teacher_force(self, prompts, responses, temperature=1.0):
        return [TokenScores([0.0] * len(r), list(r)) for r in responses]


def tiny_cfg(**over):
    return load_config("tiny", {"eval.batch_size": 3, **over})


def synthetic_items(n=6):
    return SyntheticTask().items("test", n, 0)


# ---- pass@k ------------------------------------------------------------------------------------------


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)


def test_greedy_accuracy_and_sampled_pass_at_k():
    items = synthetic_items(6)
    gold = {i.question: i.gold for i in items}
    correct_samples = {it.question: k for k, it in enumerate(items)}  # item k: first k of 5 samples right

    def answer(prompt, j, temperature):
        q = prompt[2:-1]  # "Q:{question}|"
        if temperature == 0:  # greedy: right on even items
            return f"\\boxed{{{gold[q]}}}</thought>" if list(gold).index(q) % 2 == 0 else "\\boxed{x}</thought>"
        return f"\\boxed{{{gold[q]}}}</thought>" if j < min(correct_samples[q], 5) else "\\boxed{x}</thought>"

    engine = CharEngine(answer)
    cfg = tiny_cfg()
    res = evaluate(engine, SyntheticTask(), items, cfg, samples=5, ks=(1, 2, 5), progress=False)
    assert res.n == 6 and res.accuracy == pytest.approx(3 / 6)
    cs = [min(k, 5) for k in range(6)]
    for k in (1, 2, 5):
        assert res.pass_at[k] == pytest.approx(sum(pass_at_k(5, c, k) for c in cs) / 6)
    # greedy pass (n=1, T=0) then the sampled pass (n=5 at the rollout temperature), batched by 3
    assert [r for r in engine.requests if r[1] == 0] == [(1, 0.0)] * 6
    assert [r for r in engine.requests if r[1] != 0] == [(5, cfg.rollout.temperature)] * 6
    first = res.outcomes[0]
    assert first["correct"] is True and first["rewards"] == [0.0] * 5 and first["prompt_truncated"] is False
    with pytest.raises(ValueError, match="pass@k"):
        evaluate(engine, SyntheticTask(), items, cfg, samples=2, ks=(3,), progress=False)


@pytest.mark.parametrize("samples", [1, 3])
def test_sampled_evaluation_uses_the_rollout_truncation(samples):
    """eval.temperature > 0 samples with the rollout's top-p and top-k, whatever the sample count."""
    engine = CharEngine(lambda p, j, t: "\\boxed{0}</thought>")
    cfg = tiny_cfg(**{"eval.temperature": 0.5, "rollout.top_k": 5, "rollout.top_p": 0.9})
    evaluate(engine, SyntheticTask(), synthetic_items(3), cfg, samples=samples, ks=(1,), progress=False)
    assert engine.samplings and {(s.temperature, s.top_p, s.top_k) for s in engine.samplings} == {(0.5, 0.9, 5)}


def test_default_call_is_one_greedy_pass():
    items = synthetic_items(4)
    engine = CharEngine(lambda p, j, t: "\\boxed{0}</thought>")
    res = evaluate(engine, SyntheticTask(), items, tiny_cfg(), progress=False)
    assert engine.requests == [(1, 0.0)] * 4
    assert res.pass_at == {} and res.accuracy == pytest.approx(sum(i.gold == "0" for i in items) / 4)
    assert res.generated_tokens == 4 * len("\\boxed{0}</thought>")


# ---- long prompts ------------------------------------------------------------------------------------


def long_item(n_chars=200):
    question = "HEAD" + "x" * (n_chars - 8) + "TAIL"
    return TaskItem("long", question, "1")


def test_truncate_keeps_head_and_tail_and_fits():
    cfg = tiny_cfg()  # template "Q:{question}|", max_prompt_tokens 64
    engine = CharEngine(lambda p, j, t: "")
    fitted = fit_prompt(engine, cfg, long_item(), "truncate")
    text = engine.decode(fitted.ids)
    assert len(fitted.ids) == 64  # the longest text that fits
    assert text.startswith("Q:HEAD") and text.endswith("TAIL|") and TRUNCATION_MARK in text
    assert fitted.dropped_chars == 200 - (64 - 3 - len(TRUNCATION_MARK))
    short = TaskItem("s", "1+2", "3")
    assert fit_prompt(engine, cfg, short, "truncate").dropped_chars == 0
    assert middle_cut("abcdef", 3) == "ab" + TRUNCATION_MARK + "f"


def test_long_prompt_policies_are_counted():
    cfg = tiny_cfg()
    items = [long_item(), *synthetic_items(3)]
    engine = CharEngine(lambda p, j, t: "\\boxed{1}</thought>")
    res = evaluate(engine, SyntheticTask(), items, cfg, progress=False)
    assert (res.n, res.truncated, res.skipped) == (4, 1, 0)
    assert res.outcomes[0]["prompt_truncated"] is True and res.outcomes[0]["prompt_tokens"] == 64
    res = evaluate(engine, SyntheticTask(), items, cfg, progress=False, long_prompts="skip")
    assert (res.n, res.truncated, res.skipped) == (3, 0, 1)
    assert [o for o in res.outcomes if o.get("skipped")] == [{"id": "long", "benchmark": "synthetic", "gold": "1", "skipped": True}]
    with pytest.raises(ValueError, match="rollout.max_prompt_tokens=64"):
        evaluate(engine, SyntheticTask(), items, cfg, progress=False, long_prompts="error")
    with pytest.raises(ValueError, match="long_prompts"):
        evaluate(engine, SyntheticTask(), items, cfg, progress=False, long_prompts="drop")


def test_template_longer_than_the_limit_skips():
    cfg = load_config("tiny", {"rollout.max_prompt_tokens": 3})  # "Q:" + "|" = 3; the mark alone is 5
    engine = CharEngine(lambda p, j, t: "")
    assert fit_prompt(engine, cfg, long_item(), "truncate").ids is None


# ---- benchmark-backed tasks ----------------------------------------------------------------------------


def test_every_benchmark_is_a_task():
    from srpo_core.benchmarks import list_benchmarks
    from srpo_core.tasks.benchmark import BenchmarkTask

    task = get_task("commonsenseqa")
    assert isinstance(task, BenchmarkTask) and task.name == "commonsenseqa" and not task.has_step_checker
    assert set(list_benchmarks()) <= set(TASKS)
    assert isinstance(get_task("synthetic"), SyntheticTask)  # not replaced


def test_benchmark_task_items_and_reward():
    from srpo_core.benchmarks import get_benchmark

    task = get_task("commonsenseqa")
    items = task.items("test", 5, 0)
    bench = get_benchmark("commonsenseqa")
    assert [i.id for i in items] == [i.id for i in bench.load_eval()[:5]]
    assert task.items("test", 5, 123) == items  # the eval set does not depend on the data seed
    it = items[0]
    assert it.question == bench.format_prompt(it.meta["item"]) and "\\boxed{letter}" in it.question
    assert task.reward(it, f"so \\boxed{{{it.gold}}}") == 1.0
    wrong = next(label for label in "ABCDE" if label != it.gold)
    assert task.reward(it, f"\\boxed{{{wrong}}}") == 0.0
    assert task.first_error(it, ["x</thought>"]) is None
    assert len(get_task("hmmt_nov_2025").items("test", 500, 0)) == 20  # all there are
    with pytest.raises(ValueError, match="no train split"):
        task.items("train", 5, 0)


def test_numinamath_train_and_test_are_disjoint():
    task = get_task("numinamath_olympiads")
    train, test = task.items("train", 1000, 0), task.items("test", 1000, 0)
    assert train and test and {i.id for i in train}.isdisjoint({i.id for i in test})
    assert {i.id for i in task.items("train", 1000, 1)} == {i.id for i in train}  # same pool, other order
    assert [i.id for i in task.items("train", 5, 0)] != [i.id for i in task.items("train", 5, 1)]
    assert all(i.meta["split"] == "train" for i in train)


def test_malformed_rows_are_explicit(tmp_path):
    from srpo_core.benchmarks import BenchmarkDataError, BenchmarkDataWarning
    from srpo_core.tasks.benchmark import BenchmarkTask

    good = {"id": "q1", "question": "Where?", "choices": {"label": list("ABCDE"), "text": list("abcde")}, "answerKey": "B"}
    path = tmp_path / "csqa.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "q2", "question": "no choices"}) + "\n{not json\n")
    with pytest.raises(BenchmarkDataError, match="csqa.jsonl:"):
        BenchmarkTask("commonsenseqa", path=str(path)).items("test", 10, 0)
    task = BenchmarkTask("commonsenseqa", path=str(path), on_error="skip")
    with pytest.warns(BenchmarkDataWarning, match="skipped 2 malformed rows"):
        items = task.items("test", 10, 0)
    assert [i.id for i in items] == ["q1"] and task.skipped_rows == 2
    with pytest.raises(ValueError, match="on_error"):
        BenchmarkTask("commonsenseqa", on_error="ignore")


def test_tiny_model_runs_on_a_real_benchmark(tiny_model):
    """The char-level tiny model cannot answer CommonsenseQA, but evaluation must run on it."""
    import torch

    from srpo_core.engine.hf import HFEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = tiny_model
        task = get_task("commonsenseqa")
        res = evaluate(HFEngine(model, tok), task, task.items("test", 3, 0), tiny_cfg(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert res.n == 3 and res.truncated == 3 and len(res.outcomes) == 3
    assert all(isinstance(o["correct"], bool) for o in res.outcomes)
    assert res.accuracy == pytest.approx(sum(o["correct"] for o in res.outcomes) / 3)
    assert all(o["prompt_tokens"] <= 64 for o in res.outcomes)


# ---- evaluate_suite and MLflow -------------------------------------------------------------------------


def test_evaluate_suite_logs_metrics_and_outcomes(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment(f"eval-suite-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    engine = CharEngine(lambda p, j, t: "\\boxed{A}</thought>" if t == 0 or j == 0 else "\\boxed{B}</thought>")
    cfg = load_config("tiny", {"rollout.max_prompt_tokens": 2048})
    suite = evaluate_suite(
        engine,
        cfg,
        ["synthetic", "commonsenseqa"],
        3,
        run_id=run_id,
        items_per_benchmark={"synthetic": 8, "commonsenseqa": 8},
        samples=2,
        ks=(1, 2),
        progress=False,
        out_dir=tmp_path,
        tracking_uri=mlflow_server,
    )
    csqa = suite.results["commonsenseqa"]
    golds = [i.gold for i in get_task("commonsenseqa").items("test", 8, 0)]
    assert csqa.n == 8 and csqa.accuracy == pytest.approx(golds.count("A") / 8)
    expected_p2 = sum(pass_at_k(2, (g == "A") + (g == "B"), 2) for g in golds) / 8
    assert csqa.pass_at[2] == pytest.approx(expected_p2)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/commonsenseqa/accuracy"] == pytest.approx(csqa.accuracy)
    assert metrics["eval/commonsenseqa/pass_at_2"] == pytest.approx(expected_p2)
    assert metrics["eval/synthetic/n"] == 8 and metrics["eval/commonsenseqa/truncated"] == 0
    assert {m.step for m in client.get_metric_history(run_id, "eval/synthetic/accuracy")} == {3}
    files = {f.path for f in client.list_artifacts(run_id, "eval/step_000003")}
    assert files == {"eval/step_000003/outcomes.jsonl", "eval/step_000003/outcomes.csv"}
    local = client.download_artifacts(run_id, "eval/step_000003/outcomes.jsonl", str(tmp_path / "dl"))
    rows = [json.loads(line) for line in open(local)]
    assert len(rows) == 16 and {r["benchmark"] for r in rows} == {"synthetic", "commonsenseqa"} and all(r["step"] == 3 for r in rows)
    assert (tmp_path / "eval" / "step_000003" / "outcomes.csv").read_text().startswith("step,benchmark,id,gold,correct")


def test_evaluate_suite_without_a_run_logs_nothing(tmp_path):
    engine = CharEngine(lambda p, j, t: "\\boxed{0}</thought>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        suite = evaluate_suite(engine, tiny_cfg(), ["synthetic"], 0, items_per_benchmark=4, progress=False)
    assert suite.accuracies.keys() == {"synthetic"} and suite.metrics()["eval/synthetic/n"] == 4
