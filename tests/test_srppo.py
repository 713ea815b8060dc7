"""SR-PPO (srpo_core/methods/srppo.py, srpo_core/critic.py): hand-computed credits at token and
thought granularity, the sum property on a real run's records, the reachability critic as CARO's
oracle localizer, the learned critic's loss falling, ECE/AUROC on known inputs, checkpoint and
resume with the critic, and a 2-step flow run with --method srppo."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import types

import pytest
import torch

from srpo_core import critic as C
from srpo_core import rollouts as R
from srpo_core.config import ConfigError, load_config
from srpo_core.methods import get
from srpo_core.methods.srppo import SRPPOOptions, credit_sequence_class, sequence_from_dict
from srpo_core.tasks import TaskItem, get_task
from srpo_core.tasks import synthetic as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# float64 sums of <= 64 terms of magnitude <= 1: rounding below 64 * 2^-53 ~ 1e-14
SUM_TOL = 1e-12


def _cfg(model="builtin:tiny-arith", **options):
    return load_config("tiny", {"model.name_or_path": model, "method.method": "srppo", "method.localizer": "", "method.options": options, "train.prompts_per_step": 8, "train.mini_batch_prompts": 8})


def _seq(response_len, spans, reward, first_error=None, has_checker=False, item=None, prompt=(1, 2, 3)):
    item = item or S.Problem("p", "1+1", "2")
    return credit_sequence_class()(
        list(prompt), list(range(10, 10 + response_len)), 0, 0.0, [0.0] * response_len, 0,
        reward=reward, spans=tuple(spans), first_error=first_error, has_checker=has_checker, question=item.question, gold=item.answer, item_id=item.id,
    )


class _GivenCritic:
    """A critic whose Pass@1 predictions are given (the learner step's wiring, not the head)."""

    def __init__(self, p1):
        self.p1, self.rows, self.fitted = p1, [], 0

    def predict(self, feats):
        return [torch.tensor(p, dtype=torch.float64) for p in self.p1]

    def fit(self, feats, targets):
        self.fitted += 1
        return 0.5, 0.4


# ---- credits by hand -------------------------------------------------------------------------------

# 3 thoughts over 6 tokens: thought 1 = tokens 1-2, thought 2 = tokens 3-5, thought 3 = token 6
SPANS = ((0, 2), (2, 5), (5, 6))
P1 = [0.5, 0.5, 0.6, 0.6, 0.3, 0.2, 0.1]  # the critic's Pass@1 at boundaries 0..6
P2 = [0.75, 0.75, 0.84, 0.84, 0.51, 0.36, 0.19]  # 1 - (1 - p)^2 by hand


@pytest.mark.parametrize("granularity", ["token", "thought"])
def test_credits_of_a_three_thought_rollout_by_hand(monkeypatch, granularity):
    import srpo_core.learner as L

    monkeypatch.setattr(L, "last_hidden_states", lambda learner, seqs, n: [torch.zeros(len(s.response_ids) + 1, 4) for s in seqs])
    cfg = _cfg(k=2.0, granularity=granularity)
    learner = types.SimpleNamespace(critic=_GivenCritic([P1]))
    (seq,), metrics = get("srppo").prepare_update(learner, cfg, [_seq(6, SPANS, 0.0)])
    if granularity == "token":
        # c_t = P2(t) - P2(t-1); the last token adds R - P2(6) = -0.19
        want_tokens = [0.0, 0.09, 0.0, -0.33, -0.15, (0.19 - 0.36) + (0.0 - 0.19)]
    else:
        # thoughts: P2 at boundaries 0, 2, 5, 6 = 0.75, 0.84, 0.36, 0.19; each thought's credit spread over its tokens
        thoughts = [0.84 - 0.75, 0.36 - 0.84, (0.19 - 0.36) + (0.0 - 0.19)]
        want_tokens = [thoughts[0] / 2] * 2 + [thoughts[1] / 3] * 3 + [thoughts[2]]
    # the learner gets T * c_t (its loss averages over the sequence's 6 tokens)
    assert seq.token_advantages == pytest.approx([6 * c for c in want_tokens], abs=1e-12) and seq.loss == "clip"
    (row,) = learner.critic.rows
    assert row["thought_credits"] == pytest.approx([0.09, -0.48, -0.36], abs=1e-12)  # the same per thought either way (lambda = 0 telescopes)
    assert row["boundary_pk"] == pytest.approx([0.75, 0.84, 0.36, 0.19], abs=1e-12)
    assert sum(row["thought_credits"]) == pytest.approx(0.0 - 0.75, abs=SUM_TOL) == row["advantage"]
    assert metrics["critic/loss"] == 0.5 and learner.critic.fitted == 1


def test_lambda_one_is_the_monte_carlo_advantage_against_the_value_before():
    v = torch.tensor(P2, dtype=torch.float64)
    assert C.unit_credits(v, 1.0, lam=1.0).tolist() == pytest.approx([1.0 - x for x in P2[:-1]], abs=1e-12)
    half = C.unit_credits(v, 1.0, lam=0.5)  # GAE: c_u = delta_u + 0.5 c_{u+1}
    delta = C.unit_credits(v, 1.0, lam=0.0)
    assert half[-1] == pytest.approx(float(delta[-1])) and half[0] == pytest.approx(float(delta[0] + 0.5 * half[1]))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="method.options.granularity"):
        _cfg(critic="reachability")  # thought boundaries only
    with pytest.raises(ConfigError, match="method.options.k"):
        _cfg(k=0.5)
    with pytest.raises(ConfigError, match="method.options.bogus"):
        _cfg(bogus=1)
    assert _cfg(k=float("inf"), granularity="thought").method.parsed_options.k == math.inf
    with pytest.raises(ConfigError, match="rollouts_per_prompt"):  # still grpo's rule
        load_config("tiny", {"method.method": "grpo", "method.localizer": "", "method.rollouts_per_prompt": 1})


def test_credit_sequences_cross_to_torchrun_workers_as_json():
    from dataclasses import asdict

    s = _seq(6, SPANS, 1.0, first_error=2, has_checker=True)
    back = sequence_from_dict(json.loads(json.dumps(asdict(s))))
    assert back == s and back.spans == SPANS


# ---- the reachability critic is CARO's oracle localizer -------------------------------------------


def _chains(rng, task, n):
    """Synthetic chains: gold ones, ones with a wrong step (the error propagated), ones stopped
    early, ones with a wrong answer thought; and, found by search, ones that reach the right
    answer through a wrong step (5*7 = 5*9 mod 10)."""
    out = []
    for i in range(n):
        p = S.make_problem(rng, pid=f"c{i}")
        gold = S.solution_thoughts(p)
        kind = i % 4
        if kind == 0:
            thoughts = gold
        elif kind == 1:
            thoughts, _ = S.corrupt(p, rng)
        elif kind == 2:
            thoughts = gold[: rng.randint(1, len(gold) - 1)]
        else:
            thoughts = gold[:-1] + [f"\\boxed{{{(int(p.answer) + 1) % 10}}}</thought>"]
        out.append((p, thoughts))
    lucky = 0
    while lucky < 5:  # a wrong multiplier on 0 or 5 keeps the value: the chain goes on to the right answer
        p = S.make_problem(rng, pid=f"lucky{lucky}")
        gold = S.solution_thoughts(p)
        at = [j for j, (op, b) in enumerate(p.ops) if op == "*" and gold[j].split("*")[0] in ("0", "5")]
        if at:
            j, (_, b) = at[0], p.ops[at[0]]
            other = next(m for m in S.MUL if m != b)
            thoughts = [*gold[:j], gold[j].replace(f"*{b}=", f"*{other}="), *gold[j + 1 :]]
            assert S.reward(p, "".join(thoughts)) == 1.0 and S.first_error(p, thoughts) == j + 1
            out.append((p, thoughts))
            lucky += 1
    return out


def test_reachability_credit_is_minus_one_exactly_at_the_oracle_first_error():
    task = get_task("synthetic")
    rng = random.Random(3)
    chains = _chains(rng, task, 80)
    seqs, items = [], []
    for p, thoughts in chains:
        item = TaskItem(p.id, p.question, p.answer)
        lens = [rng.randint(2, 6) for _ in thoughts]  # token counts per thought
        ends = [sum(lens[: j + 1]) for j in range(len(lens))]
        spans = tuple(zip([0, *ends[:-1]], ends))
        reward = 1.0 if S.reward(p, "".join(thoughts)) == 1.0 else 0.0
        seqs.append(_seq(ends[-1], spans, reward, task.first_error(item, thoughts), True, p))
        items.append((item, thoughts, spans))
    cfg = _cfg(critic="reachability", granularity="thought")
    learner = types.SimpleNamespace()
    out, metrics = get("srppo").prepare_update(learner, cfg, seqs)
    rows = learner.critic_rows
    # the oracle localizer of CARO/SRPO on the same chains (a seed's reset = its first wrong thought)
    cases = [R.SeedCase(item, [1], R.Rollout([1], list(range(spans[-1][1])), 0, list(spans), [], thoughts, "".join(thoughts), "answer")) for item, thoughts, spans in items]
    oracle = R.oracle_localizer(cases, R.LocalizeContext(None, task, "", 0.0, 0, False, 0))
    wrong = 0
    for s, row, loc in zip(seqs, rows, oracle):
        credits = row["thought_credits"]
        assert sum(credits) == pytest.approx(s.reward - row["boundary_pk"][0], abs=SUM_TOL)
        if s.first_error is None:  # a gold chain: nothing to blame, nothing to credit
            assert credits == [0.0] * len(credits) and s.reward == 1.0
            continue
        wrong += 1
        negative = [j + 1 for j, c in enumerate(credits) if c < 0]
        assert negative == [loc.index] and credits[loc.index - 1] == -1.0 and loc.status == "oracle"
        if s.reward == 1.0:  # right answer through a wrong step: +1 on the last thought
            assert credits[-1] == 1.0 and loc.index < len(credits)
    assert wrong >= 60 and metrics["critic/neg_credit_on_first_error"] == 1.0


def test_exact_chain_values_solve_the_graph():
    log_q = [math.log(0.5), math.log(0.8), 0.0]
    assert C.chain_success_probability(log_q) == pytest.approx([0.4, 0.8, 1.0, 1.0])
    assert C.chain_reachable(3) == [True] * 4
    node = [0.4, 0.8, 1.0, 1.0]
    assert C.exact_boundary_values(2, 3, node) == [0.4, 0.8, 0.0, 0.0]  # the wrong thought 2 leads to the failure sink
    assert C.exact_boundary_values(None, 3, node) == node


# ---- calibration metrics ---------------------------------------------------------------------------


def test_ece_and_auroc_on_known_inputs():
    conf = torch.tensor([0.05, 0.15, 0.15, 0.95, 1.0], dtype=torch.float64)  # float64: the expected values are exact to ~1e-16
    outcome = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    ece, c, a, n = C.expected_calibration_error(conf, outcome)
    # bins 0, 1, 9: |0 - 0.05| * 1 + |0.5 - 0.15| * 2 + |1 - 0.975| * 2, over 5
    assert ece == pytest.approx((0.05 + 0.7 + 0.05) / 5, abs=1e-12)
    assert n.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2] and a[1] == 0.5 and c[9] == pytest.approx(0.975)
    assert C.expected_calibration_error(torch.tensor([0.3, 0.3]), torch.tensor([0.0, 1.0]))[0] == pytest.approx(0.2)
    assert C.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert C.auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert math.isnan(C.auroc(torch.tensor([0.5]), torch.tensor([1])))
    m = C.critic_metrics([0.05, 0.15, 0.15, 0.95, 1.0], [], outcome.tolist(), [], [], False)
    fig = C.reliability_figure(*C.reliability_from_metrics(m))
    assert m["critic/ece"] == pytest.approx(ece) and len(fig.axes) == 2 and len(fig.axes[1].patches) == 10


# ---- the learned critic on the tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_learner(tiny_model_path):
    from srpo_core.learner import learner_from_config

    torch.manual_seed(0)
    return learner_from_config(_cfg(tiny_model_path))


def _chain_batch(learner, n=16, seed=0):
    """Sequences of gold and corrupted synthetic chains, tokenized by the tiny model (reward by outcome)."""
    from srpo_core import templates

    rng = random.Random(seed)
    seqs = []
    for i in range(n):
        p = S.make_problem(rng, pid=f"b{i}")
        thoughts = S.solution_thoughts(p) if i % 2 else S.corrupt(p, rng)[0]
        pieces = [learner.tokenizer.encode(t, add_special_tokens=False) for t in thoughts]
        ends = [sum(len(x) for x in pieces[: j + 1]) for j in range(len(pieces))]
        prompt = learner.tokenizer.encode(templates.rollout_prompt("tiny_rollout_v1", p.question))
        s = _seq(ends[-1], tuple(zip([0, *ends[:-1]], ends)), S.reward(p, "".join(thoughts)), S.first_error(p, thoughts), True, p, prompt=prompt)
        ids = [t for x in pieces for t in x]
        seqs.append(dataclasses.replace(s, response_ids=ids, old_logprobs=[0.0] * len(ids), prompt_index=i))
    return seqs


def test_the_critic_loss_falls_on_a_fixed_batch(tiny_learner):
    from srpo_core.learner import last_hidden_states

    seqs = _chain_batch(tiny_learner)
    feats = last_hidden_states(tiny_learner, seqs, 8)
    assert [f.shape[0] for f in feats] == [len(s.response_ids) + 1 for s in seqs]
    critic = C.CreditCritic(feats[0].shape[1], C.CriticSettings(64, 1e-2, 10, 0))
    targets = [s.reward for s in seqs]
    losses = [critic.fit(feats, targets) for _ in range(4)]
    assert all(after < before for before, after in losses)
    assert all(later[0] == pytest.approx(earlier[1], rel=1e-12) for earlier, later in zip(losses, losses[1:]))  # the same fixed batch
    rate = sum(targets) / len(targets)
    base_rate_loss = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))  # the best constant prediction's BCE
    assert losses[-1][1] < base_rate_loss - 0.1  # it tells the chains apart beyond their base rate


def test_exact_critic_uses_the_policy_probability_of_the_gold_chain(tiny_learner, tiny_model_path):
    from srpo_core.methods.srppo import gold_log_q

    cfg = _cfg(tiny_model_path, critic="exact", granularity="thought", k=4.0)
    seqs = _chain_batch(tiny_learner, n=4)
    learner = types.SimpleNamespace(model=tiny_learner.model, tokenizer=tiny_learner.tokenizer, device=tiny_learner.device)
    out, _ = get("srppo").prepare_update(learner, cfg, seqs)
    for s, row in zip(seqs, learner.critic_rows):
        log_q = gold_log_q(learner, cfg, s)
        p = [math.exp(sum(log_q[j:])) for j in range(len(log_q) + 1)]  # prod_{i > j} q_i
        want = [1 - (1 - x) ** 4 if (s.first_error is None or s.first_error > j) else 0.0 for j, x in enumerate(p)]
        assert row["boundary_pk"] == pytest.approx(want[: len(row["boundary_pk"])], rel=1e-9, abs=1e-12)


# ---- a short run: the sum property on every record -----------------------------------------------------


def test_every_record_of_a_short_run_has_credits_summing_to_reward_minus_prompt_pk(tiny_model_path, tmp_path):
    from srpo_core import loop

    cfg = _cfg(tiny_model_path, rollouts=2)
    summary = loop.train(cfg, tmp_path, max_steps=2, progress=False)
    assert summary.steps == 2
    rows = [json.loads(line) for p in sorted((tmp_path / "steps").glob("*/rollouts.jsonl")) for line in p.read_text().splitlines()]
    assert len(rows) == 2 * 8 * 2
    for r in rows:
        assert len(r["boundary_pk"]) == len(r["thought_credits"]) + 1 == max(len(r["thoughts"]), 1) + 1
        assert sum(r["thought_credits"]) == pytest.approx(r["reward"] - r["boundary_pk"][0], abs=SUM_TOL)
        assert r["advantage"] == pytest.approx(sum(r["thought_credits"]), abs=SUM_TOL)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["critic/credit_sum_error_max"] < SUM_TOL and m["critic/loss"] > 0 for m in metrics)
    assert (tmp_path / "critic" / C.CRITIC_FILE).exists()


# ---- checkpoint and resume -------------------------------------------------------------------------


def _sampled_sequences(cfg, step_index):
    from srpo_core import data_order, step
    from srpo_core.loop import open_session

    session = open_session(cfg)
    result = step.run_rollout_phases(session.engine, session.task, cfg, data_order.step_items(cfg, step_index), step_index)
    return step.train_sequences(cfg, result.records)


def test_checkpoint_and_resume_with_the_critic_gives_the_uninterrupted_next_step(tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    from srpo_core import store as Store
    from srpo_core.distributed import update_and_save
    from srpo_core.learner import learner_from_config

    cfg = _cfg(tiny_model_path, rollouts=2)
    seqs0, seqs1 = _sampled_sequences(cfg, 0), _sampled_sequences(cfg, 1)
    spec = cfg.method.spec
    # uninterrupted: one learner (and its critic) in memory for both steps, seeded as update_and_save seeds step 0
    torch.manual_seed(7)
    learner = learner_from_config(cfg)
    metrics = []
    for seqs in (seqs0, seqs1):
        trained, extra = spec.prepare_update(learner, cfg, seqs)
        learner.update(trained, cfg.train.mini_batch_prompts, cfg.train.micro_batch_sequences, cfg.train.update_epochs)
        metrics.append(extra)
    # checkpointed: step 0 saved, step 1 from the checkpoint in a fresh learner
    m0 = update_and_save(cfg, seqs0, None, tmp_path / "s0", 7)
    m1 = update_and_save(cfg, seqs1, tmp_path / "s0", tmp_path / "s1", 8)
    assert m0["critic/loss"] == metrics[0]["critic/loss"] and m1["critic/loss"] == metrics[1]["critic/loss"]
    assert m1["critic/ece"] == metrics[1]["critic/ece"]
    saved = torch.load(tmp_path / "s1" / "critic" / C.CRITIC_FILE, weights_only=True)
    for k, v in learner.critic.head.state_dict().items():
        assert torch.equal(saved["head"][k], v), k  # CPU, same operations in the same order: bit-identical
    adapter = load_file(str(tmp_path / "s1" / "adapter" / "adapter_model.safetensors"))
    live = {k.replace(".default", ""): v for k, v in learner.lora_state().items()}
    assert adapter.keys() == live.keys() and all(torch.equal(adapter[k], live[k]) for k in adapter)
    # the critic is part of the step checkpoint: its manifest hashes it, and a load verifies it
    store = Store.open_store(str(tmp_path / "art"))
    Store.save_step(store, "t", 1, tmp_path / "s1", config=cfg.to_dict())
    paths = {f.path for f in Store.read_manifest(store, "t", 1).files}
    assert {"critic/critic.pt", "critic/credits.json", "adapter/adapter_model.safetensors", "optimizer.pt"} <= paths
    # a checkpoint without the critic is refused, naming the file
    (tmp_path / "s1" / "critic" / C.CRITIC_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="critic.pt"):
        update_and_save(cfg, seqs1, tmp_path / "s1", tmp_path / "s2", 9)


# ---- the flow ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_two_step_flow_run_with_method_srppo(tmp_path, tiny_model_path, mlflow_server):
    from srpo_core import store as Store
    from tests.test_flow import flow_env, mlflow_run, quick_set, run_flow

    art = tmp_path / "art"
    env = flow_env(tmp_path, str(art), mlflow_server)
    run, stdout = run_flow(tmp_path, env, steps=2, method="srppo", set=quick_set(tiny_model_path, "eval.every_steps=0"), training_id="tiny-srppo", quiet_steps=False)
    task_logs = (tmp_path / "srpo_logs" / "tiny-srppo" / "steps.log").read_text()  # the epoch-step runs' task logs (README: the console)
    assert "method srppo has nothing to do in phase localize" in task_logs
    store = Store.open_store(str(art))
    for step in (0, 1):
        paths = {f.path for f in Store.read_manifest(store, "tiny-srppo", step).files}
        assert {"critic/critic.pt", "critic/credits.json", "adapter/adapter_model.safetensors"} <= paths
        Store.load_step(store, "tiny-srppo", step, tmp_path / f"ck{step}")
        rows = [json.loads(x) for x in (tmp_path / f"ck{step}" / "rollouts.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and all(abs(sum(r["thought_credits"]) - (r["reward"] - r["boundary_pk"][0])) < SUM_TOL for r in rows)
    client, r = mlflow_run(mlflow_server, "tiny-srppo")
    assert r.data.tags["method"] == "srppo"
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "critic/loss")) == [0, 1]
    for key in ("critic/ece", "critic/auroc", "critic/neg_credit_on_first_error", "critic/credit_mass/1"):
        assert key in r.data.metrics, key


def test_options_dataclass_defaults_are_the_summary():
    o = SRPPOOptions()
    assert (o.rollouts, o.granularity, o.lam, o.normalize, o.critic, o.loss) == (1, "token", 0.0, "none", "learned", "clip")
