"""The table-3 baselines (srpo_core/methods/score.py, critique_grpo.py, spo_tree.py), hand-computed
on scripted engines: SCoRe's shaped rewards and stage switch, Critique-GRPO's refinement choice,
advantages and shaped gradient, SPO-Tree's node advantages, token mask and rescaling; and each
method running 2 epoch steps through the Metaflow flow on the tiny preset."""

from __future__ import annotations

import json

import pytest
import torch

from srpo_core import algos, step
from srpo_core import rollouts as R
from srpo_core.config import ConfigError, load_config
from srpo_core.engine.base import Rollout
from srpo_core.methods.critique_grpo import CRITIQUES, choose_refinement
from srpo_core.tasks import SyntheticTask, TaskItem, synthetic
from tests.scripted_engine import ScriptedEngine, wrong_chain

PROBLEMS = {p.id: p for p in synthetic.make_split("train", 2, seed=0)}
ITEMS = [TaskItem(p.id, p.question, p.answer) for p in PROBLEMS.values()]


class SecondEngine(ScriptedEngine):
    """ScriptedEngine that also answers contexts other than a rollout prompt (SCoRe's second
    attempts, Critique-GRPO's refinements): the problem whose question the context holds, its
    outcome from the queue "<id>/second" ("ok" or k: first wrong thought); the contexts are kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.contexts: list[str] = []

    def generate_thoughts(self, requests, limits, sampling):
        out = []
        for req in requests:
            if req.prefix_ids or tuple(req.prompt_ids) in self.by_prompt:
                out += super().generate_thoughts([req], limits, sampling)
                continue
            text = self.decode(list(req.prompt_ids))
            self.contexts.append(text)
            problem = next(p for p in PROBLEMS.values() if f"Q:{p.question}|" in text)
            outcome = self.script[problem.id + "/second"].pop(0)
            thoughts = synthetic.solution_thoughts(problem) if outcome == "ok" else wrong_chain(problem, outcome, self.rng)
            out.append([self._rollout(req.prompt_ids, (), (), thoughts) for _ in range(req.n)])
        return out


def _cfg(method: str, loss: str, **over):
    return load_config("tiny", {"method.method": method, "loss.loss": loss, "method.localizer": "", "train.prompts_per_step": 2, "train.mini_batch_prompts": 2, **over})


# ---- SCoRe -----------------------------------------------------------------------------------


def test_score_shaped_rewards_alpha_10():
    r1 = torch.tensor([0.0, 0.0, 1.0, 1.0])
    r2 = torch.tensor([0.0, 1.0, 0.0, 1.0])
    y1, y2 = algos.score_shaped_rewards(r1, r2, 10.0, stage=2)
    assert y1.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert y2.tolist() == [0.0, 11.0, -10.0, 1.0]  # R(y2) + 10 (R(y2) - R(y1)): stay wrong, correct, break, stay right
    y1, y2 = algos.score_shaped_rewards(r1, r2, 10.0, stage=1)
    assert y1.tolist() == [0.0] * 4 and y2.tolist() == r2.tolist()


def test_score_pairs_second_attempt_context_and_stage_switch():
    """4 pairs per prompt; y2 sampled (and trained) after question + y1 + instruction; step 0 is
    stage I (y1 reward 0, KL 0.1), step 1 stage II (shaped, KL 0.01)."""
    cfg = _cfg("score", "clip", **{"method.options": {"stage1_steps": 1}})
    script = {"train-0": ["ok", 2, "ok", 3] * 2, "train-0/second": [2, "ok", "ok", 3] * 2, "train-1": ["ok"] * 8, "train-1/second": ["ok"] * 8}
    engine = SecondEngine(PROBLEMS, script)
    by_step = {}
    for s in (0, 1):
        res = step.run_rollout_phases(engine, SyntheticTask(), cfg, ITEMS, s)
        by_step[s] = res
        recs = [r for r in res.records if r.item.id == "train-0"]
        assert [r.role for r in recs] == ["attempt1", "attempt2"] * 4 and all(r.trainable for r in recs)
        y2 = recs[1]
        assert y2.rollout.prompt_ids[: len(recs[0].rollout.prompt_ids) + len(recs[0].rollout.response_ids)] == recs[0].rollout.prompt_ids + recs[0].rollout.response_ids
        assert engine.decode(y2.rollout.prompt_ids).endswith(f"\nQ:{PROBLEMS['train-0'].question}|")  # the tiny instruction after y1
        seqs = step.train_sequences(cfg, res.records)
        assert len(seqs) == 16 and seqs[1].prompt_ids == y2.rollout.prompt_ids  # trained in its real context
    # rewards: y1 (1, 0, 1, 0), y2 (0, 1, 1, 0)
    stage1 = [(r.role, r.trained_reward, r.kl_coef) for r in by_step[0].records if r.item.id == "train-0"]
    y1, y2 = ("attempt1", 0.0, 0.1), ("attempt2", 0.0, 0.01)
    assert stage1 == [y1, y2, y1, ("attempt2", 1.0, 0.01), y1, ("attempt2", 1.0, 0.01), y1, y2]
    stage2 = [(r.trained_reward, r.advantage, r.kl_coef) for r in by_step[1].records if r.item.id == "train-0"]
    assert stage2 == [(1.0, 1.0, 0.01), (-10.0, -10.0, 0.01), (0.0, 0.0, 0.01), (11.0, 11.0, 0.01), (1.0, 1.0, 0.01), (1.0, 1.0, 0.01), (0.0, 0.0, 0.01), (0.0, 0.0, 0.01)]


def test_score_kl_to_the_adapter_disabled_base(tiny_model_path):
    """The learner's reference is the base with the adapter off: a fresh LoRA (B = 0) equals it,
    so the KL estimate is (old - ref) = the shift put into the old log-probs."""
    from srpo_core.learner import TrainSequence, learner_from_config

    cfg = _cfg("score", "clip", **{"model.name_or_path": tiny_model_path})
    learner = learner_from_config(cfg)
    prompt, resp = learner.tokenizer.encode("Q:1+2|", add_special_tokens=False), learner.tokenizer.encode("1+2=3</thought>\\boxed{3}</thought>", add_special_tokens=False)
    ref = learner.reference_logprobs([TrainSequence(prompt, resp, 0, 1.0, [0.0] * len(resp), 0)])[0]
    seq = TrainSequence(prompt, resp, 0, 1.0, [x + 0.5 for x in ref], 0, kl_coef=0.1)
    out, m = learner.reference_kl_advantages([seq, TrainSequence(prompt, resp, 0, 2.0, ref, 0)])
    # float32 log-softmax of the same logits twice: identical, so the shift is exact up to float64 addition
    assert m["learner/kl_ref_mean"] == pytest.approx(0.5, abs=1e-9) and out[0].advantage == pytest.approx(1.0 - 0.1 * 0.5, abs=1e-9)
    assert out[1].advantage == 2.0  # kl_coef 0: untouched


# ---- Critique-GRPO ---------------------------------------------------------------------------


def test_score_evaluation_scores_the_second_attempt_as_an_option(tiny_model):
    """Table 3 scores the first attempt; `method.options.eval_second_attempt` adds the second to
    the comparison's evaluation (eval/<benchmark>/second_attempt_accuracy), off by default."""
    from srpo_core.engine.hf import HFEngine
    from srpo_core.evaluate import evaluate_suite

    engine = HFEngine(*tiny_model)
    off = evaluate_suite(engine, _cfg("score", "clip"), ["synthetic"], 0, items_per_benchmark=8, progress=False, log_to_mlflow=False)
    assert off.extra == {} and "eval/synthetic/second_attempt_accuracy" not in off.metrics()
    on = evaluate_suite(engine, _cfg("score", "clip", **{"method.options": {"eval_second_attempt": True}}), ["synthetic"], 0, items_per_benchmark=8, progress=False, log_to_mlflow=False)
    m = on.metrics()
    assert m["eval/synthetic/first_attempt_accuracy"] == m["eval/synthetic/accuracy"]  # the same greedy first attempt
    assert 0.0 <= m["eval/synthetic/second_attempt_accuracy"] <= 1.0


def test_critique_refinement_choice_buffer_and_mean_advantages():
    """Originals rewards (1,0,1,0,0,1,0,0); refinements (0,1,1,0,...): the first correct (chain 1)
    replaces original 8; A = r - mean of the 8 trained = r - 4/8; 16 generations, 8 trained."""
    assert choose_refinement([0.0, 1.0, 1.0], [False, True, True]) == 1 and choose_refinement([0.0, 0.0], [False, False]) == 0
    cfg = _cfg("critique_grpo", "critique")
    script = {"train-0": ["ok", 2, "ok", 3, 2, "ok", 4, 3], "train-0/second": [2, "ok", "ok"] + [3] * 5, "train-1": [2] * 8, "train-1/second": [3] * 8}
    engine = SecondEngine(PROBLEMS, script)
    res = step.run_rollout_phases(engine, SyntheticTask(), cfg, ITEMS, 0)
    recs = [r for r in res.records if r.item.id == "train-0"]
    trained = [r for r in recs if r.trainable]
    assert [(r.role, r.node) for r in trained] == [("original", f"chain{j}") for j in range(7)] + [("refinement", "chain1")]
    assert [r.advantage for r in trained] == [0.5, -0.5, 0.5, -0.5, -0.5, 0.5, -0.5, 0.5]
    assert sum(1 for r in res.records if r.trainable) == 16 and len(res.records) == 32
    # the critique sentence of each chain in its refinement prompt (the checker's verdict)
    ctx = engine.contexts[:8]
    assert [CRITIQUES[True] in c for c in ctx] == [True, False, True, False, False, True, False, False]
    # no correct refinement: the first one; every reward 0 -> A = 0
    other = [r for r in res.records if r.item.id == "train-1" and r.trainable]
    assert other[-1].node == "chain0" and all(r.advantage == 0.0 for r in other)
    assert res.metrics["tokens/generated"] == sum(r.rollout.generated_tokens for r in res.records) > res.metrics["tokens/trained"]
    seqs = step.train_sequences(cfg, res.records)
    assert [s.loss for s in seqs[:8]] == ["critique"] * 7 + ["critique_refinement"] and dict(seqs[7].loss_kwargs)["gamma"] == 0.1
    assert seqs[7].prompt_ids == trained[-1].rollout.prompt_ids  # trained after its own refinement prompt
    authors = _cfg("critique_grpo", "critique", **{"method.options": {"refinement_context": "question"}})
    assert step.train_sequences(authors, res.records)[7].prompt_ids == trained[0].rollout.prompt_ids  # the question-only prompt


def test_critique_shaped_term_gradient():
    """d/d logp of -A f(p) / T, f(p) = p / (p + gamma), is -A gamma p / (p + gamma)^2 / T; the
    original tokens' -A exp(logp - old) / T has gradient -A exp(logp - old) / T (no clip)."""
    logp = torch.log(torch.tensor([[0.05, 0.5, 0.9]], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([[0.1, 0.4, 0.9]], dtype=torch.float64))
    mask, adv, gamma = torch.ones(1, 3, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64), 0.1
    algos.critique_refinement_loss(logp, old, adv, mask, gamma=gamma, entropy_coef=0.0).sum().backward()
    p = logp.detach().exp()
    assert torch.allclose(logp.grad, -2.0 * gamma * p / (p + gamma) ** 2 / 3, atol=1e-12)  # float64 autograd vs the closed form
    logp.grad = None
    algos.critique_onpolicy_loss(logp, old, adv, mask, entropy_coef=0.0).sum().backward()
    assert torch.allclose(logp.grad, -2.0 * torch.exp(logp.detach() - old) / 3, atol=1e-12)
    logp.grad = None
    algos.critique_onpolicy_loss(logp, old, torch.zeros(1, dtype=torch.float64), mask, entropy_coef=0.001).sum().backward()
    assert torch.allclose(logp.grad, 0.001 * logp.detach() / 3, atol=1e-15)  # the entropy surrogate: -c * d/dlogp(-(logp)^2/2) / T


# ---- SPO-Tree --------------------------------------------------------------------------------


def test_spo_tree_node_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # V_a = 0.25, V_b = 0.75
    seg, leaf = algos.tree_advantages(rewards, (2, 4))
    assert seg.tolist() == [(0.25 - 0.75) / 2, (0.75 - 0.25) / 2]
    assert leaf.tolist() == [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]
    with pytest.raises(ValueError, match="7 leaves for shape"):
        algos.tree_values(rewards[:7], (2, 4))


def test_spo_tree_probability_mask_and_rescaling():
    credits = torch.tensor([[1.0, 1.0, -2.0, -2.0], [3.0, 3.0, 3.0, 0.0]], dtype=torch.float64)
    old = torch.log(torch.tensor([[0.5, 0.95, 0.2, 0.99], [0.99, 0.99, 0.99, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    out = algos.probability_mask_credits(credits, old, mask, 0.9)
    assert out.tolist() == [[2.0, 0.0, -4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # kept 2 of 4: x4/2; row 2 keeps nothing
    # the mean over all active tokens of the rescaled credits is the mean over the kept ones
    assert algos.sequence_mean(out, mask)[0].item() == pytest.approx((1.0 - 2.0) / 2)


def _leaf_records(rewards, seg_len=3, leaf_len=2):
    item = ITEMS[0]
    recs = []
    for j in range(2):
        seg = Rollout([1, 2], [7] * seg_len, 0, [], [-0.05, -2.0, -0.01][:seg_len], [], "", "segment")
        recs.append(R.Record(seg, item, "generated", "0:train-0:base:segments", 0.0, role="segment", node=str(j), trained=False))
        for k in range(4):
            leaf = Rollout([1, 2], [7] * seg_len + [8] * leaf_len, seg_len, [], [-1.0] * leaf_len, [], "", "answer")
            recs.append(R.Record(leaf, item, "base", "0:train-0:base", rewards[j * 4 + k], role="leaf", node=f"{j}.{k}", trains_prefix=True))
    return recs


def test_spo_tree_leaf_credits_and_sequences():
    """Segment tokens carry their segment's advantage, the leaf's own tokens its advantage; the
    pi_old < 0.9 mask drops the two near-certain segment tokens (p = e^-0.05, e^-0.01) and rescales
    the rest by T / kept = 5 / 3."""
    cfg = _cfg("spo_tree", "clip")
    recs = _leaf_records([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    cfg.method.spec.advantages(recs)
    leaf00 = recs[1]
    assert leaf00.token_advantages == [-0.25] * 3 + [0.75] * 2
    seqs = step.train_sequences(cfg, recs)
    assert len(seqs) == 8 and seqs[0].prefix_len == 0 and seqs[0].old_logprobs == [-0.05, -2.0, -0.01, -1.0, -1.0]
    assert seqs[0].token_advantages == pytest.approx((0.0, -0.25 * 5 / 3, 0.0, 0.75 * 5 / 3, 0.75 * 5 / 3))
    off = step.train_sequences(_cfg("spo_tree", "clip", **{"method.options": {"prob_mask": False}}), recs)
    assert off[0].token_advantages == (-0.25, -0.25, -0.25, 0.75, 0.75)
    m = sum(r.trained_tokens for r in recs)
    assert m == 8 * 5 and sum(r.rollout.generated_tokens for r in recs) == 2 * 3 + 8 * 2  # trained: segments in every leaf; generated: once


def test_spo_tree_segments_cut_by_tokens_keep_thoughts():
    """A free-running segment: thoughts at the stop token, an answer thought ends the chain; a
    leaf continuing a cut thought joins it."""
    from srpo_core.engine.base import Completion
    from srpo_core.methods.spo_tree import join_cut_thought, segment_from_completion

    engine = ScriptedEngine(PROBLEMS, {})
    from srpo_core.shard import limits_of

    limits = limits_of(_cfg("spo_tree", "clip"))
    ids = engine.encode("1+2=3</thought>3*4=")
    seg = segment_from_completion(engine, [5], Completion(ids, "", [-0.1] * len(ids), "length"), limits)
    assert seg.finish_reason == "segment" and seg.thoughts == ["1+2=3</thought>"] and seg.spans == [(0, 6)]
    leaf_ids = ids + engine.encode("2</thought>\\boxed{2}</thought>")
    leaf = Rollout([5], leaf_ids, len(ids), [(0, 6), (len(ids), len(ids) + 2), (len(ids) + 2, len(leaf_ids))], [-0.1] * (len(leaf_ids) - len(ids)), [], "", "answer")
    joined = join_cut_thought(engine, leaf, seg)
    assert joined.thoughts == ["1+2=3</thought>", "3*4=2</thought>", "\\boxed{2}</thought>"]
    done = engine.encode("\\boxed{3}</thought>7+7")
    seg = segment_from_completion(engine, [5], Completion(done, "", [-0.1] * len(done), "length"), limits)
    assert seg.finish_reason == "answer" and len(seg.response_ids) == 4 and seg.thoughts == ["\\boxed{3}</thought>"]


def test_spo_tree_shape_must_fill_the_budget():
    with pytest.raises(ConfigError, match="method.options.shape"):
        _cfg("spo_tree", "clip", **{"method.options": {"shape": [3, 4]}})
    with pytest.raises(ConfigError, match="loss.loss"):
        load_config("tiny", {"method.method": "critique_grpo", "method.localizer": ""})  # tiny's pg is not critique_grpo's loss


def test_comparison_rows_carry_each_method_loss():
    from srpo_core.compare.plan import make_variants, variant_labels

    vs = make_variants(["grpo", "srpo", "score", "critique_grpo", "spo_tree"], ["1x4"], ["self"])
    assert [v.overrides().get("loss.loss") for v in vs] == [None, None, "clip", "critique", "clip"]
    assert list(variant_labels(vs).values()) == ["GRPO", "SRPO", "SCoRe", "Critique-GRPO", "SPO-Tree"]
    base = load_config("tiny")
    for v in vs:
        base.override(**v.overrides())  # every row is a valid config on the tiny preset


# ---- through the Metaflow flow ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method,loss", [("score", "clip"), ("critique_grpo", "critique"), ("spo_tree", "clip")])
def test_two_epoch_steps_through_the_flow(tmp_path, tiny_model_path, method, loss):
    from tests.test_flow import flow_env, run_flow

    art = tmp_path / "art"
    env = flow_env(tmp_path, str(art), f"sqlite:///{tmp_path}/mlflow.db")
    sets = f"model.name_or_path={tiny_model_path} eval.items_per_benchmark=10 data.train_size=8 train.prompts_per_step=4 train.mini_batch_prompts=4 loss.loss={loss}"
    run, _ = run_flow(tmp_path, env, steps=2, method=method, set=sets, training_id=f"tiny-{method}", quiet_steps=True)
    assert run["end"].task.data.summary["training_id"] == f"tiny-{method}"
    from srpo_core import store as S

    store = S.open_store(str(art))
    for s in (0, 1):
        prefix = S.step_prefix(f"tiny-{method}", s)
        lines = [json.loads(x) for x in store.get_bytes(f"{prefix}/rollouts.jsonl").decode().splitlines()]
        per_prompt: dict[str, int] = {}
        for rec in lines:
            per_prompt[rec["prompt_id"]] = per_prompt.get(rec["prompt_id"], 0) + int(rec["trained"])
        assert len(per_prompt) == 4 and set(per_prompt.values()) == {8}, per_prompt
        roles = {rec["role"] for rec in lines}
        assert roles == {"score": {"attempt1", "attempt2"}, "critique_grpo": {"original", "refinement"}, "spo_tree": {"segment", "leaf"}}[method]
        metrics = json.loads(store.get_bytes(f"{prefix}/metrics.json"))
        assert metrics["tokens/generated"] == sum(r["generated_tokens"] for r in lines) and metrics["tokens/trained"] == sum(r["trained_tokens"] for r in lines)
