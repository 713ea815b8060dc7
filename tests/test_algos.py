"""Hand-computed cases for advantages, masks and losses (srpo_core/algos.py)."""

import math

import pytest
import torch

from srpo_core import algos


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    adv = algos.group_advantages(rewards, groups)
    # group 0: mean 0.25, population std sqrt(0.25 * 0.75)
    std = math.sqrt(0.25 * 0.75)
    assert adv[:4].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], abs=1e-6)
    assert adv[:4].tolist() == pytest.approx([math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)], abs=1e-6)
    # flat group -> exactly zero
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]
    # two-element group {0, 1}: mean 0.5, std 0.5 -> -1, +1
    assert adv[8:].tolist() == pytest.approx([-1.0, 1.0])


def test_group_advantages_partial_credit_and_population_std():
    rewards = torch.tensor([0.5, 0.25, 1.0])
    adv = algos.group_advantages(rewards, torch.tensor([0, 0, 0]))
    mean = (0.5 + 0.25 + 1.0) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in (0.5, 0.25, 1.0)) / 3)  # ddof = 0
    assert adv.tolist() == pytest.approx([(r - mean) / std for r in (0.5, 0.25, 1.0)], abs=1e-6)


def test_response_mask_marks_suffix_only():
    mask = algos.response_mask(torch.tensor([0, 2]), torch.tensor([3, 5]), 6)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]


def test_masked_tokens_contribute_nothing():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    mask = algos.response_mask(torch.tensor([1]), torch.tensor([3]), 4)
    adv = torch.tensor([2.0])
    base = algos.pg_loss(logp, logp, adv, mask)
    changed = logp.clone()
    changed[0, 0], changed[0, 3] = -100.0, -50.0  # prefix and padding positions
    assert algos.pg_loss(changed, changed, adv, mask).item() == base.item()


def test_shared_prefix_loss_is_mean_over_suffix_tokens():
    logp = torch.tensor([[-0.5, -1.5, -2.0, -3.0, -1.0]], requires_grad=True)
    prefix_len, resp_len = 2, 5
    mask = algos.response_mask(torch.tensor([prefix_len]), torch.tensor([resp_len]), 5)
    loss = algos.pg_loss(logp, logp.detach(), torch.tensor([1.5]), mask)
    assert loss.item() == pytest.approx(-1.5 * (-2.0 - 3.0 - 1.0) / 3)
    loss.sum().backward()
    # d/dlogp: -A / T_suffix on suffix tokens, zero on the prefix
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, -0.5, -0.5, -0.5])


def test_batch_loss_averages_sequences():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -4.0]])
    mask = torch.ones(2, 2)
    per_seq = algos.pg_loss(logp, logp, torch.tensor([1.0, -1.0]), mask)
    assert per_seq.tolist() == pytest.approx([1.0, -3.0])
    assert per_seq.mean().item() == pytest.approx(-1.0)


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    mask = torch.ones(1, 3)
    # A > 0: min(r A, clip(r, 0.8, 1.2) A) -> 1.2, 0.5, 1.1
    pos = algos.clipped_surrogate_loss(new, old, torch.tensor([1.0]), mask, clip_eps=0.2, dual_clip=3.0)
    assert pos.item() == pytest.approx(-(1.2 + 0.5 + 1.1) / 3, abs=1e-6)
    # A < 0: min(r A, clip(r) A) -> -1.5, -0.8, -1.1; dual clip max(., 3A=-3) leaves them
    neg = algos.clipped_surrogate_loss(new, old, torch.tensor([-1.0]), mask, clip_eps=0.2, dual_clip=3.0)
    assert neg.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3, abs=1e-6)
    # dual clip bites at a large ratio with A < 0: r = 5 -> max(-5, -3) = -3
    big = algos.clipped_surrogate_loss(torch.log(torch.tensor([[5.0]])), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert big.item() == pytest.approx(3.0)


def test_clip_and_pg_gradients_agree_on_policy():
    """At ratio 1 the clipped surrogate has the policy-gradient's gradient."""
    logp = torch.tensor([[-0.3, -1.2, -0.7]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    adv = torch.tensor([0.8])
    algos.pg_loss(logp, logp.detach(), adv, mask).sum().backward()
    g_pg = logp.grad.clone()
    logp.grad = None
    algos.clipped_surrogate_loss(logp, logp.detach(), adv, mask).sum().backward()
    assert torch.allclose(logp.grad, g_pg)


def test_losses_registry_names():
    """The paper's loss and its clip ablation, and every loss a registered method may choose."""
    from srpo_core.config import LOSSES

    assert {"pg", "clip"} <= set(algos.LOSSES) and set(LOSSES) <= set(algos.LOSSES)


def test_gradient_signal_hand_computed():
    adv = torch.tensor([2.0, -1.0])
    probs = torch.tensor([[0.5, 0.9, 0.0], [0.2, 0.2, 0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    g = algos.gradient_signal(adv, probs, mask)
    # seq 0: |A|/T = 1 -> mean(0.5, 0.1) = 0.3;  seq 1: 0.5 * mean(0.8, 0.8) = 0.4
    assert g.tolist() == pytest.approx([0.3, 0.4])


def test_token_logprobs_at_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = algos.token_logprobs(logits, torch.tensor([[0]]), temperature=0.5)
    assert lp.item() == pytest.approx(math.log(math.exp(4) / (math.exp(4) + 1)), abs=1e-6)


def test_chunked_logprobs_same_numbers_and_only_the_logits_kept_for_backward():
    """Slices recomputed in backward: values and gradients identical to the one-shot computation,
    and what autograd keeps is the bf16 logits (2 bytes per entry), not the float32 softmax (4)."""
    torch.manual_seed(0)
    n, t, v = 4, 64, 1000
    logits, targets = torch.randn(n, t, v, dtype=torch.bfloat16), torch.randint(0, v, (n, t))

    def run(chunk):
        x = logits.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel() * s.element_size()) or s, lambda s: s):
            lp = algos.token_logprobs(x, targets, 0.7, chunk)
        (lp * torch.linspace(-1, 1, t)).sum().backward()
        return lp, x.grad, sum(saved)

    lp, grad, saved = run(0)
    lp_c, grad_c, saved_c = run(32)  # 8 positions x 4 rows per slice
    assert torch.equal(lp, lp_c) and torch.equal(grad, grad_c)
    logits_bytes, targets_bytes = n * t * v * 2, n * t * 8
    assert saved >= 2 * logits_bytes  # the [N, T, V] float32 log-softmax
    assert saved_c <= logits_bytes + targets_bytes


def test_warmup_factor_is_linear_over_optimizer_steps():
    # W = 4: steps 0..3 at 1/4, 2/4, 3/4, 1 of the rate, then the rate; W = 0: the rate from the start
    assert [algos.warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [algos.warmup_factor(k, 0) for k in range(3)] == [1.0, 1.0, 1.0]
    assert algos.warmup_factor(0, 1) == 1.0
    with pytest.raises(ValueError, match="must be >= 0"):
        algos.warmup_factor(-1, 4)
