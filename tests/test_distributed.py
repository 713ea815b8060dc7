"""The multi-process learner: FSDP2 over 2 gloo processes on this CPU (torchrun) gives the same
update as one process, saves checkpoints any process count can resume, keeps fp32 LoRA beside a
bf16 base; micro-batch planning by hand; token-budget micro-batches, gradient checkpointing and
forwarding shared contexts once leave the update unchanged; a failing worker is reported.

Tolerances (derived, not measured):
- float32 reductions: a gradient component is a sum over the batch's tokens of products formed
  through k chained float32 stages (forward and backward of 2 decoder layers: attention, MLP,
  lm_head), each a reduction of at most n = 512 terms (the MLP width; the token sums are <= 400).
  Reordering a sum of n terms (other micro-batches, another process's partial sum and gloo's
  all-reduce, other matmul blockings) changes it by about sqrt(n) * u relative to its terms, u =
  2^-24; k = 8 stages give REL_F32 = 8 * sqrt(512) * 2^-24 = 1.1e-5, compared norm-wise
  (||a - b|| <= REL_F32 ||b||) so one component with cancellation does not dominate.
- Adam: a step moves a weight by lr * m_hat / (sqrt(v_hat) + eps); where a gradient is ~0 (below
  what reordering changes), the step's direction is noise and can differ by up to ~lr between two
  runs that are both right. So weights are not compared with one bound: each run's saved moments
  are compared like gradients (above), and the weight change is checked element by element against
  the AdamW formula evaluated on each run's own saved moments (`_check_adam_step`), whose only
  slack is float32 rounding of the update itself.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo_core.config import load_config
from srpo_core.distributed import learn
from srpo_core.learner import Learner, TrainSequence, plan_micro_batches, shared_contexts

U_F32 = 2.0**-24  # float32 unit roundoff
REL_F32 = 8 * 512**0.5 * U_F32  # 1.1e-5: k = 8 chained float32 reductions of <= 512 terms (module docstring)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL_F32) -> bool:
    """Norm-wise relative agreement ||a - b|| <= rel * ||b||."""
    return float((a.double() - b.double()).norm()) <= rel * float(b.double().norm())


def _groups(n_prompts: int, g: int, seed: int, first_prompt: int) -> list[TrainSequence]:
    """Per prompt: g base rollouts (context: the prompt) and g suffixes of one reset prefix
    (context: prompt + prefix), as a shared-prefix step gives the learner; one zero advantage."""
    rng = random.Random(seed)
    out = []
    for k in range(n_prompts):
        p = [rng.randrange(3, 40) for _ in range(rng.randrange(4, 9))]
        prefix = [rng.randrange(3, 40) for _ in range(rng.randrange(2, 9))]
        for j in range(g):
            r = [rng.randrange(3, 40) for _ in range(rng.randrange(1, 12))]
            out.append(TrainSequence(p, r, 0, rng.choice([1.0, -0.5, 0.0, 0.7]), [-rng.random() for _ in r], first_prompt + k))
        for j in range(g):
            x = [rng.randrange(3, 40) for _ in range(rng.randrange(1, 12))]
            out.append(TrainSequence(p, prefix + x, len(prefix), rng.choice([1.0, -0.5, 0.7]), [-rng.random() for _ in x], first_prompt + k))
    return out


def _sequences(n: int = 20, seed: int = 0) -> list[TrainSequence]:
    """Prompts 0..3: sequences that share nothing (with `_cfg`'s 4 prompts a mini-batch: the plain
    path); prompts 8..11: shared-context groups (the second mini-batch, the shared path)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(3, 40) for _ in range(rng.randrange(4, 9))]
        r = [rng.randrange(3, 40) for _ in range(rng.randrange(3, 15))]
        pre = rng.randrange(0, 2)
        out.append(TrainSequence(p, r, pre, rng.choice([1.0, -0.5, 0.0, 0.7]), [-rng.random() for _ in range(len(r) - pre)], i // 5))
    return out + _groups(4, 3, seed, first_prompt=8)


def _cfg(model_path, **kw):
    """Mini-batches of 4 prompts: `_sequences` gives one that shares nothing and one of groups."""
    return load_config("tiny", {"model.name_or_path": model_path, "train.micro_batch_sequences": 3, "train.mini_batch_prompts": 4, "optim.lr": 1e-2, **kw})


def _adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def _delta(after: dict, before: dict) -> torch.Tensor:
    return torch.cat([(after[k].float() - before.get(k, torch.zeros_like(after[k])).float()).flatten() for k in sorted(after)])


# ---- micro-batch planning (hand-computed) ------------------------------------------------------


def test_plan_deals_longest_first_with_equal_counts():
    # lengths by index: 0:5 1:9 2:3 3:7 -> order 1, 3, 0, 2; pairs [1, 3], [0, 2]
    assert plan_micro_batches([5, 9, 3, 7], 1, 2) == [[[1, 3], [0, 2]]]
    assert plan_micro_batches([5, 9, 3, 7], 2, 2) == [[[1, 3]], [[0, 2]]]
    # a 14-token budget: [1] alone (2 x 9 > 14), [3, 0] (2 x 7 = 14), [2]; dealt 0, 1, 0 -> rank 1 pads
    assert plan_micro_batches([5, 9, 3, 7], 2, 4, 14) == [[[1], [2]], [[3, 0], []]]
    # a sequence longer than the budget still goes (alone); more processes than work: empty slots
    assert plan_micro_batches([50, 2], 3, 4, 10) == [[[0]], [[1]], [[]]]
    assert plan_micro_batches([], 2, 4) == [[], []]


def test_plan_keeps_a_group_in_one_micro_batch_where_it_fits():
    # lengths by index: 0:5 1:9 2:3 3:7 4:6 5:4; groups (longest first inside): [4, 0, 2], [1], [3, 5]
    lengths, groups = [5, 9, 3, 7, 6, 4], [[0, 2, 4], [1], [3, 5]]
    # units by their longest: [1] (9), [3, 5] (7), [4, 0, 2] (6); [1, 3, 5] has room for 4, not 6
    assert plan_micro_batches(lengths, 1, 4, 0, groups) == [[[1, 3, 5], [4, 0, 2]]]
    # 20 tokens: [1] + [3, 5] would be 3 x 9 = 27; [4, 0, 2] is 3 x 6 = 18; dealt 0, 1, 0
    assert plan_micro_batches(lengths, 2, 4, 20, groups) == [[[1], [4, 0, 2]], [[3, 5], []]]
    # a group over the limit is cut into chunks as large as it allows, longest first
    assert plan_micro_batches(lengths, 1, 4, 0, [list(range(6))]) == [[[1, 3, 4, 0], [5, 2]]]
    assert plan_micro_batches(lengths, 1, 4, 14, [list(range(6))]) == [[[1], [3, 4], [0, 5], [2]]]


def test_shared_contexts_group_by_prompt_and_prefix():
    a = TrainSequence([1, 2], [3, 4, 5], 1, 1.0, [-0.1, -0.1], 0)
    same = TrainSequence([1, 2], [3, 9], 1, -1.0, [-0.1], 0)  # prompt + prefix [1, 2, 3] as a
    base = TrainSequence([1, 2], [3, 4, 5], 0, 1.0, [-0.1] * 3, 0)  # context: the prompt alone
    other_prompt = TrainSequence([1, 2], [3, 7], 1, 1.0, [-0.1], 1)  # the same ids, another prompt of the step
    assert shared_contexts([a, base, same, other_prompt, base]) == [[0, 2], [1, 4], [3]]
    assert a.context == (1, 2, 3) and base.context == (1, 2)


@pytest.mark.parametrize("world,max_seqs,max_tokens", [(1, 3, 0), (2, 3, 0), (3, 2, 40), (4, 8, 25)])
def test_plan_covers_every_sequence_once_within_budget(world, max_seqs, max_tokens):
    lengths = [random.Random(world).randrange(1, 30) for _ in range(37)]
    plan = plan_micro_batches(lengths, world, max_seqs, max_tokens)
    assert len(plan) == world and len({len(p) for p in plan}) == 1
    flat = sorted(i for p in plan for micro in p for i in micro)
    assert flat == list(range(len(lengths)))
    for micro in (m for p in plan for m in p if m):
        assert len(micro) <= max_seqs
        if max_tokens and len(micro) > 1:
            assert max(lengths[i] for i in micro) * len(micro) <= max_tokens


# ---- in-process equivalences -------------------------------------------------------------------


def _one_update(cfg, seqs, **kw):
    """The LoRA change of one update under plain SGD (lr 1): minus the clipped gradient, which
    unlike Adam's first step keeps the gradient's scale."""
    torch.manual_seed(0)
    learner = Learner(
        cfg.model.name_or_path,
        cfg.lora,
        cfg.optim,
        dtype=cfg.model.dtype,
        temperature=cfg.rollout.temperature,
        gradient_checkpointing=kw.pop("gradient_checkpointing", False),
        share_prefix_forward=kw.pop("share", True),
    )
    learner.optimizer = torch.optim.SGD([p for p in learner.model.parameters() if p.requires_grad], lr=1.0)
    before = learner.lora_state()
    metrics = learner.update(seqs, cfg.train.mini_batch_prompts, **kw)
    return _delta(learner.lora_state(), before), metrics


def test_update_is_the_gradient_of_the_loss_written_out(tiny_model_path):
    """Against eq. 4.3 computed one sequence at a time with full logits, no masks and no padding:
    L = -(1/N) sum_i A_i * mean over trained tokens of log pi (N: the mini-batch's sequences).
    The learner forwards the shared contexts of the second mini-batch once; the written-out loss
    runs every sequence whole, so this is also 'same gradients as G separate sequences'."""
    cfg, seqs = _cfg(tiny_model_path, **{"optim.grad_clip": 1e9, "optim.weight_decay": 0.0, "train.mini_batch_prompts": 16}), _sequences()  # one mini-batch
    delta, _ = _one_update(cfg, seqs, micro_batch_sequences=3)  # SGD lr 1, no clipping: -gradient
    torch.manual_seed(0)
    learner = Learner(cfg.model.name_or_path, cfg.lora, cfg.optim, dtype=cfg.model.dtype)
    loss = 0.0
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logp = torch.log_softmax(learner.model(input_ids=ids).logits[0].float() / cfg.rollout.temperature, -1)
        trained = range(len(s.prompt_ids) + s.prefix_len, len(s.prompt_ids) + len(s.response_ids))
        loss = loss - s.advantage * torch.stack([logp[t - 1, ids[0, t]] for t in trained]).mean() / len(seqs)
    loss.backward()
    grads = {n: p.grad for n, p in learner.model.named_parameters() if p.requires_grad}
    expected = -torch.cat([grads[k].flatten() for k in sorted(grads)])
    assert expected.abs().max() > 1e-2
    assert _close(delta, expected)


def test_token_budget_and_checkpointing_leave_the_update_unchanged(tiny_model_path):
    cfg, seqs = _cfg(tiny_model_path), _sequences()
    ref, m_ref = _one_update(cfg, seqs, micro_batch_sequences=64)
    small, m_small = _one_update(cfg, seqs, micro_batch_sequences=64, micro_batch_tokens=40)
    ckpt, _ = _one_update(cfg, seqs, micro_batch_sequences=3, gradient_checkpointing=True)
    assert m_ref["learner/micro_batches"] == 2 and m_small["learner/micro_batches"] > 8  # one per mini-batch / many
    assert m_small["learner/active_tokens"] == m_ref["learner/active_tokens"]
    assert ref.abs().max() > 1e-2  # the step moved the adapter
    assert _close(small, ref) and _close(ckpt, ref)


@pytest.mark.parametrize("micro_batch_sequences,micro_batch_tokens,checkpointing", [(64, 0, False), (3, 0, False), (64, 40, False), (4, 0, True)])
def test_shared_contexts_forwarded_once_give_the_same_update(tiny_model_path, micro_batch_sequences, micro_batch_tokens, checkpointing):
    """Forwarding each shared context once (its keys/values expanded to the suffix rows) against
    every sequence whole, with micro-batches that cut groups, a token budget and checkpointing."""
    cfg, seqs = _cfg(tiny_model_path, **{"optim.grad_clip": 1e9}), _groups(4, 4, 3, first_prompt=0)
    plain, m_plain = _one_update(cfg, seqs, micro_batch_sequences=64, share=False)
    shared, m_shared = _one_update(cfg, seqs, micro_batch_sequences=micro_batch_sequences, micro_batch_tokens=micro_batch_tokens, gradient_checkpointing=checkpointing)
    assert plain.abs().max() > 1e-2
    assert _close(shared, plain)
    assert m_shared["learner/loss"] == pytest.approx(m_plain["learner/loss"], rel=REL_F32)
    assert m_shared["learner/active_tokens"] == m_plain["learner/active_tokens"]
    # each micro-batch forwards each of its contexts once: fewer tokens than the whole sequences
    live = [s for s in seqs if s.advantage != 0.0]
    assert m_plain["learner/forward_tokens"] == sum(len(s.prompt_ids) + len(s.response_ids) for s in live)
    assert m_shared["learner/forward_tokens"] < m_plain["learner/forward_tokens"]
    if micro_batch_sequences == 64 and not micro_batch_tokens:  # one micro-batch per mini-batch: every context once
        assert m_shared["learner/forward_tokens"] == sum(len(c) for c in {(s.prompt_index, s.context) for s in live} for c in [c[1]]) + sum(len(s.response_ids) - s.prefix_len for s in live)


# ---- two processes under torchrun ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """Step 1 with 1 and 2 processes, forwarding shared contexts once ("1", "2") and every sequence
    whole ("1n", "2n"); step 2 from the 2-process checkpoint with 2 and with 1. One mini-batch per
    step (one optimizer step: `_check_adam_step` compares steps that start from equal weights)."""
    root = tmp_path_factory.mktemp("dist")
    seqs, seqs2 = _sequences(), _sequences(seed=1)
    whole = {"train.mini_batch_prompts": 16}
    one, two = _cfg(tiny_model_path, **whole), _cfg(tiny_model_path, **whole, **{"train.processes": 2})
    plain = {**whole, "train.share_prefix_forward": False}
    m = {
        "1": learn(one, seqs, None, root / "1", 0, canary_path=root / "c1.json"),
        "2": learn(two, seqs, None, root / "2", 0, canary_path=root / "c2.json"),
        "1n": learn(_cfg(tiny_model_path, **plain), seqs, None, root / "1n", 0),
        "2n": learn(_cfg(tiny_model_path, **plain, **{"train.processes": 2}), seqs, None, root / "2n", 0),
        "22": learn(two, seqs2, root / "2", root / "22", 1),
        "21": learn(one, seqs2, root / "2", root / "21", 1),
    }
    return root, m


def _optimizer(path: Path) -> dict:
    return torch.load(path / "optimizer.pt")


def _moments(opt: dict, key: str) -> torch.Tensor:
    """One AdamW moment ("exp_avg" or "exp_avg_sq") of every parameter, concatenated by name."""
    state = opt["optimizer"]["state"]
    return torch.cat([state[k][key].double().flatten() for k in sorted(state)])


def _adam_direction(opt: dict) -> dict[str, torch.Tensor]:
    """m_hat / (sqrt(v_hat) + eps) per parameter (float64), from a saved optimizer after its last
    step: what AdamW subtracted, times lr, from each weight at that step."""
    group, steps = opt["optimizer"]["param_groups"][0], opt["optimizer_steps"]
    (b1, b2), eps = group["betas"], group["eps"]
    out = {}
    for name, st in opt["optimizer"]["state"].items():
        m_hat = st["exp_avg"].double() / (1 - b1**steps)
        v_hat = st["exp_avg_sq"].double() / (1 - b2**steps)
        out[name.replace(".default", "")] = m_hat / (v_hat.sqrt() + eps)  # peft's adapter file drops the adapter name
    return out


def _check_adam_step(after_a: dict, after_b: dict, opt_a: dict, opt_b: dict) -> None:
    """Two runs that started the step from the same weights and moments: AdamW set
    w' = w (1 - lr wd) - lr u with u from each run's own moments (`_adam_direction`), so
    w'_a - w'_b = -lr (u_a - u_b) exactly but for float32 rounding of the update, at most a few
    units u = 2^-24 of |w'| and of lr |u| per element (8 units allowed: the decay product, the
    division, the square root, the bias corrections and the subtraction). Holds element by element
    however far Adam's normalisation carries a near-zero gradient's noise."""
    lr = opt_a["optimizer"]["param_groups"][0]["lr"]
    assert lr == opt_b["optimizer"]["param_groups"][0]["lr"]
    ua, ub = _adam_direction(opt_a), _adam_direction(opt_b)
    assert ua.keys() == after_a.keys() == after_b.keys()
    for k in ua:
        wa, wb = after_a[k].double(), after_b[k].double()
        err = (wa - wb) + lr * (ua[k] - ub[k])
        tol = 8 * U_F32 * (wa.abs() + wb.abs() + lr * (ua[k].abs() + ub[k].abs()))
        assert (err.abs() <= tol).all(), f"{k}: max excess {float((err.abs() - tol).max()):.3g}"


@pytest.mark.parametrize("one,two", [("1", "2"), ("1n", "2n")], ids=["shared-contexts", "whole-sequences"])
def test_two_fsdp_processes_match_one(runs, one, two):
    root, m = runs
    assert m[one]["learner/processes"] == 1 and m[two]["learner/processes"] == 2
    assert 0.1 < m[two]["learner/peak_rss_gb"] < 8  # a torch process with the tiny model, per process
    for key in ("learner/loss", "learner/grad_norm"):  # sums over micro-batches in another order
        assert m[two][key] == pytest.approx(m[one][key], rel=REL_F32)
    for key in ("learner/active_tokens", "learner/micro_batches", "learner/optimizer_steps", "learner/forward_tokens"):
        assert m[two][key] == m[one][key]
    assert m[one]["learner/optimizer_steps"] == 1
    a, b = _adapter(root / one), _adapter(root / two)
    assert a.keys() == b.keys() and len(a) == 28  # 2 layers x 7 modules x (A, B)
    oa, ob = _optimizer(root / one), _optimizer(root / two)
    assert oa["optimizer"]["state"].keys() == ob["optimizer"]["state"].keys()
    # the gradients: exp_avg is linear in them, exp_avg_sq quadratic (twice the relative error)
    assert _close(_moments(ob, "exp_avg"), _moments(oa, "exp_avg"))
    assert _close(_moments(ob, "exp_avg_sq"), _moments(oa, "exp_avg_sq"), 2 * REL_F32)
    _check_adam_step(a, b, oa, ob)  # both started from the same seeded initial adapter
    # with or without shared contexts: the same gradients
    assert _close(_moments(_optimizer(root / "2"), "exp_avg"), _moments(_optimizer(root / "2n"), "exp_avg"))
    assert m["2"]["learner/forward_tokens"] < m["2n"]["learner/forward_tokens"]


def test_the_fsdp_learners_canary_scores_its_adapter(runs, tiny_model_path):
    """The 2-process learner's canary scores are its saved adapter's: what one process scores with
    it, within the canary check's own float32 tolerance for identical weights (server/canary.py)."""
    from srpo_core.server.canary import TOLERANCES, canary_reference

    root, _ = runs
    cfg = _cfg(tiny_model_path)
    tol, mean_tol = TOLERANCES["float32"]
    for run in ("1", "2"):
        saved = json.loads((root / f"c{run}.json").read_text())
        own = canary_reference(Learner(cfg.model.name_or_path, cfg.lora, cfg.optim, temperature=cfg.rollout.temperature, adapter_path=str(root / run / "adapter")))
        assert saved["response_ids"] == own.response_ids and saved["dtype"] == own.dtype == "float32"
        diffs = [abs(x - y) for x, y in zip(saved["logprobs"], own.logprobs, strict=True)]
        assert max(diffs) <= tol and sum(diffs) / len(diffs) <= mean_tol


def test_a_checkpoint_resumes_with_another_process_count(runs):
    root, m = runs
    assert m["22"]["learner/processes"] == 2 and m["21"]["learner/processes"] == 1
    o2, o22, o21 = _optimizer(root / "2"), _optimizer(root / "22"), _optimizer(root / "21")
    assert o22["optimizer_steps"] == o21["optimizer_steps"] == 2  # the optimizer continued
    step2 = _delta(_adapter(root / "22"), _adapter(root / "2"))
    assert step2.abs().max() > 1e-3
    # the new gradients, from exp_avg = b1 m_ckpt + (1 - b1) g: equal up to reordering (REL_F32),
    # plus the float32 rounding of the three stored moments amplified by 1 / (1 - b1). A resume that
    # lost the checkpoint's moments would differ by b1 m_ckpt / (1 - b1), far above this.
    b1 = o2["optimizer"]["param_groups"][0]["betas"][0]
    m2, m22, m21 = (_moments(o, "exp_avg") for o in (o2, o22, o21))
    g22, g21 = (m22 - b1 * m2) / (1 - b1), (m21 - b1 * m2) / (1 - b1)
    rounding = U_F32 * (m22.norm() + m21.norm() + 2 * b1 * m2.norm()) / (1 - b1)
    assert float((g21 - g22).norm()) <= REL_F32 * float(g22.norm()) + float(rounding)
    _check_adam_step(_adapter(root / "21"), _adapter(root / "22"), o21, o22)  # both from checkpoint 2


U_BF16 = 2.0**-9  # bfloat16 unit roundoff (8 significand bits)
REL_BF16 = 16 * U_BF16  # 3.1e-2: k = 16 bf16 roundings on a gradient's path (test_bf16_base_with_fp32_lora_under_fsdp)


def test_bf16_base_with_fp32_lora_under_fsdp(tiny_model_path, tmp_path):
    """The paper preset's shape: bf16 base, peft's fp32 LoRA, checkpointing, shared contexts.
    FSDP2's policy computes in bf16, the LoRA weights included, where one process computes the
    LoRA products in fp32: the two differ by bf16 roundings, not only by reordering. Each rounding
    is relative 2^-9; a gradient's path crosses about k = 16 of them where the two differ (the LoRA
    weights, the LoRA input and output, per layer and direction: 2 layers x 2 (forward, backward) x
    4), so the gradients (exp_avg) agree norm-wise within REL_BF16 = 16 * 2^-9. The optimizer runs in
    fp32 in both, so each run's weights follow AdamW on its own moments (`_check_adam_step`)."""
    seqs = _sequences()
    kw = {"model.dtype": "bfloat16", "train.gradient_checkpointing": True, "train.mini_batch_prompts": 16}  # one optimizer step
    m1 = learn(_cfg(tiny_model_path, **kw), seqs, None, tmp_path / "1", 0)
    m2 = learn(_cfg(tiny_model_path, **kw, **{"train.processes": 2}), seqs, None, tmp_path / "2", 0)
    assert m1["learner/forward_tokens"] == m2["learner/forward_tokens"] < sum(len(s.prompt_ids) + len(s.response_ids) for s in seqs if s.advantage)
    a, b = _adapter(tmp_path / "1"), _adapter(tmp_path / "2")
    assert {v.dtype for v in b.values()} == {torch.float32}
    oa, ob = _optimizer(tmp_path / "1"), _optimizer(tmp_path / "2")
    assert _close(_moments(ob, "exp_avg"), _moments(oa, "exp_avg"), REL_BF16)
    _check_adam_step(a, b, oa, ob)


def test_a_failing_worker_is_reported(tiny_model_path, tmp_path, capfd):
    cfg = _cfg(tiny_model_path, **{"train.processes": 2})
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint/adapter/adapter_config.json"):
        learn(cfg, _sequences(), tmp_path / "no-such-checkpoint", tmp_path / "out", 0)  # before any launch
    broken = tmp_path / "broken"
    (broken / "adapter").mkdir(parents=True)
    (broken / "adapter" / "adapter_config.json").write_text("{}")
    (broken / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="torchrun with 2 processes"):
        learn(cfg, _sequences(), broken, tmp_path / "out", 0)
    err = capfd.readouterr().err
    assert "Root Cause" in err and "in update_and_save" in err  # the worker's own traceback, in torchrun's summary


def test_a_killed_learner_step_leaves_no_processes(tiny_model_path, tmp_path):
    """kill -9 of the step process while torchrun's workers train: agent and workers go too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nfrom pathlib import Path\nfrom srpo_core.config import load_config\nfrom srpo_core.distributed import learn\n"
        "from tests.test_distributed import _sequences\n"
        f"cfg = load_config('tiny', {{'model.name_or_path': {tiny_model_path!r}, 'train.processes': 2, 'train.update_epochs': 10000}})\n"
        f"learn(cfg, _sequences(), None, Path({str(tmp_path / 'out')!r}), 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the agent and both workers are up and training
            family = psutil.Process(proc.pid).children(recursive=True)
            if sum("srpo_core.distributed" in " ".join(c.cmdline()) for c in family if c.is_running()) >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the torchrun workers did not start: {[c.cmdline() for c in family]}")
        time.sleep(2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _gone, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        for c in [*family, proc]:
            try:
                c.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


def test_more_processes_than_gpus_is_refused(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="train.processes=3: 3 learner processes but 2 visible GPUs"):
        learn(_cfg(tiny_model_path, **{"train.processes": 3}), _sequences(), None, tmp_path / "out", 0)


def test_the_learner_and_the_launcher_import_no_circle():
    """fsdp (primitives) <- learner (the model) <- distributed (the torchrun launcher): a fresh
    interpreter importing the learner loads neither the launcher nor the training driver, and the
    launcher loads no training driver at import."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import srpo_core.fsdp\n"
        "assert not {'srpo_core.learner', 'srpo_core.distributed'} & set(sys.modules), 'fsdp imports learner/distributed'\n"
        "import srpo_core.learner\n"
        "assert not {'srpo_core.distributed', 'srpo_core.train'} & set(sys.modules), 'learner imports distributed/train'\n"
        "import srpo_core.distributed\n"
        "assert 'srpo_core.train' not in sys.modules, 'distributed imports train'\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
