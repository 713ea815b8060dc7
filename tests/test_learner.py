"""LoRA learner on the tiny model: two srpo steps change the adapter and only the adapter; the
adapter round-trips in PEFT format; a real srpo step's sequences give the same update with their
shared contexts forwarded once; a mini-batch without signal still takes its AdamW step; the
learning-rate warmup follows its formula and continues after a resume.

Tolerances: logits of the same weights computed twice differ only by float32 reordering, at most
REL_F32 = 8 * sqrt(512) * 2^-24 = 1.1e-5 of the largest logit (8 chained reductions of <= 512
terms: hidden 128, MLP 512, vocab 104); gradients likewise, norm-wise. An AdamW step recomputed by
hand in float64 differs from torch's float32 one by a few roundings (8 units u = 2^-24 allowed) of
|w| and of lr |m_hat / (sqrt(v_hat) + eps)| per element.
"""

import json

import pytest
import torch

from srpo_core import step as step_algorithm
from srpo_core.config import load_config
from srpo_core.learner import Learner, TrainSequence, learner_from_config
from srpo_core.loop import open_session, train_step

U_F32 = 2.0**-24
REL_F32 = 8 * 512**0.5 * U_F32


@pytest.fixture(scope="module")
def session(tiny_model_path):
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, "method.localizer": "oracle", "train.prompts_per_step": 8, "train.mini_batch_prompts": 4})
    return open_session(cfg)


def test_two_srpo_steps_change_lora_only(session, tmp_path):
    lora0, base0 = session.learner.lora_state(), session.learner.base_state()
    assert lora0 and base0
    items = session.task.items("train", 16, 0)
    metrics = []
    for step in range(2):
        result = train_step(session, items[step * 8 : (step + 1) * 8], step, tmp_path)
        metrics.append(result.metrics)
    assert sum(m["learner/optimizer_steps"] for m in metrics) >= 2
    lora1, base1 = session.learner.lora_state(), session.learner.base_state()
    changed = [k for k in lora0 if not torch.equal(lora0[k], lora1[k])]
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert all(torch.equal(base0[k], base1[k]) for k in base0)
    assert all(not p.requires_grad for n, p in session.learner.model.named_parameters() if "lora_" not in n)
    # the records of both steps were written, with the documented fields
    rows = [json.loads(l) for l in (tmp_path / "steps" / "000001" / "rollouts.jsonl").read_text().splitlines()]
    fields = {"step", "prompt_id", "group_id", "group", "split", "localizer", "reset_index", "oracle_first_error", "prefix_tokens", "response_tokens", "thoughts", "reward", "advantage"}
    assert rows and all(fields <= set(r) for r in rows)
    assert {r["group"] for r in rows} <= {"base", "shared_prefix", "fallback", "seed"}
    for r in rows:
        if r["group"] == "shared_prefix":
            assert r["reset_index"] == r["oracle_first_error"] or r["oracle_first_error"] > len(r["thoughts"])
        if r["group"] == "base":
            assert r["reset_index"] is None and r["prefix_tokens"] == 0


def test_adapter_round_trips_in_peft_format(session, tmp_path, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = session.learner.save_adapter(tmp_path / "adapter")
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(path)).eval()
    ids = torch.tensor([session.engine.encode("Q:7*3-2-8+1|7*3=1</thought>")])
    with torch.no_grad():
        a = session.learner.model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert (a - b).abs().max() <= REL_F32 * a.abs().max()


def _adamw_check(learner: Learner, before: dict, lr: float, weight_decay: float) -> None:
    """The last optimizer step was AdamW at rate `lr`: w' = w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
    with the moments the optimizer now holds (torch.optim.AdamW's documented update), element by
    element within float32 rounding (module docstring)."""
    after = learner.lora_state()
    for name, p in learner.model.named_parameters():
        if not p.requires_grad:
            continue
        st, group = learner.optimizer.state[p], learner.optimizer.param_groups[0]
        (b1, b2), eps, t = group["betas"], group["eps"], int(st["step"])
        u = (st["exp_avg"].double() / (1 - b1**t)) / ((st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + eps)
        w = before[name].double()
        expected = w * (1 - lr * weight_decay) - lr * u
        tol = 8 * U_F32 * (w.abs() + lr * u.abs())
        assert ((after[name].double() - expected).abs() <= tol).all(), name


def _signal() -> list[TrainSequence]:
    return [TrainSequence([5, 6, 7], [8, 9, 10], 0, 1.0, [-0.1] * 3, 0), TrainSequence([5, 6, 7], [9, 8], 0, -1.0, [-0.1] * 2, 0)]


def test_an_all_zero_advantage_mini_batch_still_steps_adamw(tiny_model_path):
    """As the reference trainer: a mini-batch whose advantages are all zero has a zero gradient
    and still takes its AdamW step, so weight decay and the momentum of earlier steps move the
    LoRA weights, exactly as a hand-run AdamW step with g = 0 (m' = b1 m, v' = b2 v)."""
    lr, wd = 1e-2, 0.1
    learner = learner_from_config(load_config("tiny", {"model.name_or_path": tiny_model_path, "optim.lr": lr, "optim.weight_decay": wd}))
    learner.update(_signal(), 8, 8)  # one step with signal: momentum
    params = {n: p for n, p in learner.model.named_parameters() if p.requires_grad}
    moments = {n: (learner.optimizer.state[p]["exp_avg"].clone(), learner.optimizer.state[p]["exp_avg_sq"].clone()) for n, p in params.items()}
    before = learner.lora_state()
    m = learner.update([TrainSequence([5, 6, 7], [8, 9], 0, 0.0, [-0.1, -0.2], 0)], 8, 8)
    assert m["learner/optimizer_steps"] == 1.0 and learner.optimizer_steps == 2
    b1, b2 = learner.optimizer.param_groups[0]["betas"]
    for n, p in params.items():  # the moments decayed by a zero gradient (lerp and mul: a rounding or two)
        assert torch.allclose(learner.optimizer.state[p]["exp_avg"], moments[n][0] * b1, rtol=4 * U_F32, atol=0)
        assert torch.allclose(learner.optimizer.state[p]["exp_avg_sq"], moments[n][1] * b2, rtol=4 * U_F32, atol=0)
    _adamw_check(learner, before, lr, wd)
    after = learner.lora_state()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every LoRA tensor moved


def test_warmup_rates_and_a_resume_continues_them(tiny_model_path, tmp_path):
    """optim.warmup_steps W: optimizer step k (0-based) runs at lr (k + 1) / W, then lr; the step
    count travels in optimizer.pt, so a resumed learner continues the schedule."""
    lr, wd, w = 1e-2, 0.01, 3
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, "optim.lr": lr, "optim.weight_decay": wd, "optim.warmup_steps": w})
    learner = learner_from_config(cfg)
    rates = []
    for k in range(w + 2):
        before = learner.lora_state()
        rates.append(learner.update(_signal(), 8, 8)["learner/lr"])
        _adamw_check(learner, before, rates[-1], wd)  # the rate AdamW applied
        if k == 0:
            learner.save_adapter(tmp_path / "adapter")
            learner.save_optimizer(tmp_path / "optimizer.pt")
    assert rates == pytest.approx([lr / 3, 2 * lr / 3, lr, lr, lr], rel=1e-12)
    resumed = learner_from_config(cfg, str(tmp_path / "adapter"))
    resumed.load_optimizer(tmp_path / "optimizer.pt")
    before = resumed.lora_state()
    assert resumed.update(_signal(), 8, 8)["learner/lr"] == pytest.approx(2 * lr / 3, rel=1e-12)
    _adamw_check(resumed, before, 2 * lr / 3, wd)
    # the default (the paper): no warmup
    plain = learner_from_config(load_config("tiny", {"model.name_or_path": tiny_model_path, "optim.lr": lr}))
    assert plain.update(_signal(), 8, 8)["learner/lr"] == lr


def test_a_real_steps_shared_contexts_give_the_same_update(session, tiny_model_path):
    """An srpo step's sequences (oracle resets: G suffixes per reset prefix, G base rollouts per
    prompt): forwarding each shared context once gives the update of whole sequences (SGD lr 1:
    minus the gradient), norm-wise within REL_F32, with fewer tokens through the model."""
    cfg = session.cfg
    items = session.task.items("train", 16, 0)[8:16]
    seqs = step_algorithm.train_sequences(cfg, step_algorithm.run_rollout_phases(session.engine, session.task, cfg, items, 5).records)
    assert any(s.prefix_len > 0 for s in seqs) and any(s.prefix_len == 0 for s in seqs)

    def update(share: bool):
        torch.manual_seed(0)
        learner = Learner(tiny_model_path, cfg.lora, cfg.optim, temperature=cfg.rollout.temperature, share_prefix_forward=share)
        learner.optimizer = torch.optim.SGD([p for p in learner.model.parameters() if p.requires_grad], lr=1.0)
        before = learner.lora_state()
        metrics = learner.update(seqs, len(items), 64)
        after = learner.lora_state()
        return torch.cat([(after[k] - before[k]).flatten() for k in sorted(after)]).double(), metrics

    (plain, m_plain), (shared, m_shared) = update(False), update(True)
    assert plain.norm() > 0
    assert (shared - plain).norm() <= REL_F32 * plain.norm()
    assert m_shared["learner/forward_tokens"] < m_plain["learner/forward_tokens"]


def test_prefix_tokens_get_no_gradient(session):
    """The loss of a shared-prefix sequence does not depend on its prefix tokens' log-probs."""
    learner = session.learner
    ids = session.engine.encode("Q:7*3-2|")
    resp = session.engine.encode("7*3=1</thought>1-2=9</thought>\\boxed{9}</thought>")
    seq = TrainSequence(ids, resp, 6, 1.0, [-0.5] * (len(resp) - 6), 0)
    full, attn, targets, mask, old, keep = learner._tensors([seq])
    p, s0 = len(ids), len(ids) + 6 - 1  # s0: the first trained next-token position
    assert keep == p + len(resp) - s0 and targets[0].tolist() == resp[6:]
    assert mask[0].nonzero()[:, 0].tolist() == list(range(len(resp) - 6))
    assert old[0].tolist() == pytest.approx([-0.5] * (len(resp) - 6))
    # logits of the kept positions only: the same numbers as the full forward's
    with torch.no_grad():
        whole = learner.model(input_ids=full, attention_mask=attn).logits[:, s0:-1]
        kept = learner.model(input_ids=full, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
    assert kept.shape == whole.shape and (kept - whole).abs().max() <= REL_F32 * whole.abs().max()


@pytest.mark.parametrize("loss", ["pg", "clip"])
@pytest.mark.parametrize("share", [False, True])
def test_token_level_credits_train_what_they_say(session, tiny_model_path, loss, share):
    """Token-level credits (TrainSequence.token_advantages) equal to a sequence's advantage on
    every token give that sequence's update; credits on one token only move the weights by the
    gradient of that token's log-prob term (-(c / n) * d log pi_t): each checked against a
    per-sequence-advantage update, norm-wise within REL_F32 (module docstring)."""
    import dataclasses

    cfg = session.cfg
    items = session.task.items("train", 16, 0)[8:12]
    seqs = step_algorithm.train_sequences(cfg, step_algorithm.run_rollout_phases(session.engine, session.task, cfg, items, 6).records)
    seqs = [s for s in seqs if s.advantage != 0][:12]
    assert seqs and any(s.prefix_len > 0 for s in seqs)

    def delta(batch):
        torch.manual_seed(0)
        learner = Learner(tiny_model_path, cfg.lora, cfg.optim, temperature=cfg.rollout.temperature, loss=loss, share_prefix_forward=share)
        learner.optimizer = torch.optim.SGD([p for p in learner.model.parameters() if p.requires_grad], lr=1.0)
        before = learner.lora_state()
        learner.update(batch, len(items), 64)
        return torch.cat([(learner.lora_state()[k] - before[k]).flatten() for k in before])

    per_sequence = delta(seqs)
    per_token = delta([dataclasses.replace(s, token_advantages=(s.advantage,) * (len(s.response_ids) - s.prefix_len)) for s in seqs])
    assert per_sequence.norm() > 0 and (per_token - per_sequence).norm() <= REL_F32 * per_sequence.norm()
    named = delta([dataclasses.replace(s, loss=loss) for s in seqs])  # the same loss named per sequence
    assert (named - per_sequence).norm() <= REL_F32 * per_sequence.norm()
    # credit c on the last trained token only: with pg, -(c / n) log pi_T, i.e. the update of a
    # one-token sequence whose advantage is c / n at that position
    s = seqs[0]
    n = len(s.response_ids) - s.prefix_len
    only_last = dataclasses.replace(s, token_advantages=(0.0,) * (n - 1) + (2.0,))
    if loss == "pg":
        last_token = dataclasses.replace(s, prompt_ids=s.prompt_ids + s.response_ids[:-1], response_ids=s.response_ids[-1:], prefix_len=0, advantage=2.0 / n, old_logprobs=s.old_logprobs[-1:])
        a, b = delta([only_last]), delta([last_token])
        assert a.norm() > 0 and (a - b).norm() <= REL_F32 * b.norm()
