"""Advantages, masks and losses: small pure functions on tensors.

Notation: N sequences in a batch (B prompts x up to G samples, flattened), T response tokens.

Group-relative advantage (GRPO, RRPO and SRPO alike), per advantage group g:
    A_i = (r_i - mean_g(r)) / std_g(r)      population std (ddof=0); a flat group gives A = 0.
The methods differ only in which rollouts share a group (see rollouts.py): `grpo` puts G iid
rollouts of a prompt in one group; `rrpo`/`srpo` put the iid base rollouts in one group and the
G suffixes sampled from a reset prefix x* = prompt + thoughts 1..h*-1 in another. RRPO draws h*
uniformly, SRPO asks the policy for the first wrong thought.

Policy-gradient loss (paper eq. 4.3, no ratio, no clip, no KL):
    L = -(1/N) sum_i A_i * (1/T_i) sum_{t active} log pi(y_it | x, y_i<t)
where the active tokens of a shared-prefix rollout are its suffix tokens only (the reset prefix
is masked) and those of a base rollout are its whole response. The clipped surrogate (paper
table 4 ablation) replaces log pi by the PPO dual-clipped ratio objective on the same mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """rewards [N] float, group_ids [N] long in 0..K-1 -> advantages [N]."""
    k = int(group_ids.max()) + 1 if group_ids.numel() else 0
    ones = torch.ones_like(rewards)
    count = torch.zeros(k, dtype=rewards.dtype, device=rewards.device).index_add_(0, group_ids, ones)  # [K]
    mean = torch.zeros_like(count).index_add_(0, group_ids, rewards) / count  # [K]
    centered = rewards - mean[group_ids]  # [N]
    var = torch.zeros_like(count).index_add_(0, group_ids, centered**2) / count  # [K] population variance
    std = var.sqrt()[group_ids]  # [N]
    return torch.where(std < eps, torch.zeros_like(rewards), centered / std.clamp(min=eps))


def response_mask(prefix_len: torch.Tensor, response_len: torch.Tensor, width: int) -> torch.Tensor:
    """Active tokens: response positions prefix_len <= t < response_len. [N], [N] -> [N, T] float."""
    t = torch.arange(width, device=prefix_len.device)[None, :]  # [1, T]
    return ((t >= prefix_len[:, None]) & (t < response_len[:, None])).float()


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over each sequence's active tokens (count clamped >= 1). [N, T] -> [N]."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def pg_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **_: float) -> torch.Tensor:
    """Per-sequence loss -A_i * mean_t log pi (token-level credits: -mean_t A_it log pi).
    logprobs [N, T], advantages [N] or [N, T], mask [N, T] -> [N]."""
    if advantages.dim() == 2:
        return -sequence_mean(advantages * logprobs, mask)
    return -advantages * sequence_mean(logprobs, mask)


def clipped_surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, dual_clip: float = 3.0, **_: float) -> torch.Tensor:
    """Per-sequence PPO dual-clip surrogate, averaged over active tokens. logprobs, old_logprobs
    [N, T], advantages [N] (one per sequence) or [N, T] (token-level credits), mask [N, T] -> [N]."""
    ratio = torch.exp(logprobs - old_logprobs)  # [N, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None]  # [N, T] or [N, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # [N, T]
    surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)
    return -sequence_mean(surrogate, mask)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"pg": pg_loss, "clip": clipped_surrogate_loss}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_tokens: int = 0) -> torch.Tensor:
    """log softmax(logits / temperature) at the targets. logits [N, T, V], targets [N, T] -> [N, T].

    chunk_tokens > 0: over slices of positions holding about that many tokens (N x slice), each
    recomputed in backward (activation checkpointing), so the float32 softmax of only one slice is
    alive at a time and what stays saved is the logits themselves (2 bytes/vocab entry in bf16
    instead of ~14 for the whole [N, T, V] float32 chain). Same values and gradients."""
    if chunk_tokens <= 0:
        return _token_logprobs(logits, targets, temperature)
    from torch.utils.checkpoint import checkpoint

    width = max(1, chunk_tokens // max(logits.shape[0], 1))
    parts = [checkpoint(_token_logprobs, logits[:, i : i + width], targets[:, i : i + width], temperature, use_reentrant=False) for i in range(0, logits.shape[1], width)]
    return torch.cat(parts, 1) if parts else _token_logprobs(logits, targets, temperature)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)  # [N, T, V]
    return torch.log_softmax(scaled, -1).gather(-1, targets[..., None])[..., 0]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear learning-rate warmup: the multiplier of `optim.lr` for optimizer step `step` (0-based,
    the number of steps taken before it). Step k < W uses (k + 1) / W, so no step is spent at lr 0
    and step W - 1 is the first at the full rate; W = 0 (the paper's setting): 1 from the start."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"warmup_factor: step {step} and warmup_steps {warmup_steps} must be >= 0")
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def gradient_signal(advantages: torch.Tensor, token_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token gradient signal (paper app. 14) g_t = |A| / T_i * (1 - p_t), averaged over a
    rollout's active tokens. advantages [N], token_probs [N, T], mask [N, T] -> [N]."""
    t_i = mask.sum(-1).clamp(min=1.0)  # [N]
    per_token = advantages.abs()[:, None] / t_i[:, None] * (1 - token_probs)  # [N, T]
    return sequence_mean(per_token, mask)


# ---- the table-3 baselines (srpo_core/methods/score.py, critique_grpo.py, spo_tree.py) ----------


def score_shaped_rewards(r1: torch.Tensor, r2: torch.Tensor, alpha: float, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SCoRe's trained rewards of its pairs (y1, y2). r1, r2 [P] -> (reward of y1 [P], of y2 [P]).
    Stage II: y1 gets R(y1), y2 gets R(y2) + alpha (R(y2) - R(y1)) (the bonus for correcting).
    Stage I: y1 gets 0 (it is only held near the reference by the stronger KL), y2 gets R(y2)."""
    if stage not in (1, 2):
        raise ValueError(f"score_shaped_rewards: stage must be 1 or 2, got {stage}")
    if stage == 1:
        return torch.zeros_like(r1), r2.clone()
    return r1.clone(), r2 + alpha * (r2 - r1)


def mean_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Critique-GRPO's advantage: reward minus its group's mean, no std. rewards [N], group_ids
    [N] long in 0..K-1 -> [N]."""
    k = int(group_ids.max()) + 1 if group_ids.numel() else 0
    count = torch.zeros(k, dtype=rewards.dtype, device=rewards.device).index_add_(0, group_ids, torch.ones_like(rewards))  # [K]
    mean = torch.zeros_like(count).index_add_(0, group_ids, rewards) / count.clamp(min=1)  # [K]
    return rewards - mean[group_ids]


def refinement_shaping(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Critique-GRPO's (and LUFFY's) policy shaping f(p) = p / (p + gamma), elementwise; its
    derivative gamma / (p + gamma)^2 weighs rare tokens of a refinement up."""
    return probs / (probs + gamma)


def _entropy_surrogate(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence surrogate whose gradient is the score-function estimate of the gradient of the
    mean token entropy: for y ~ pi, grad H = -E[log pi(y) grad log pi(y)] = grad E[-(log pi(y))^2 / 2]
    (the sampled tokens held fixed). Exact in expectation for tokens sampled from the policy in
    the context they are trained in; needs no logits beyond the sampled tokens'. [N, T] -> [N]."""
    return sequence_mean(-0.5 * logprobs**2, mask)


def critique_onpolicy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, entropy_coef: float = 0.001, **_: float) -> torch.Tensor:
    """Critique-GRPO on its own chains: -mean_t A exp(log pi - log pi_old) (the unclipped ratio)
    minus entropy_coef times the entropy surrogate. logprobs, old_logprobs [N, T], advantages [N]
    or [N, T], mask [N, T] -> [N]."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]  # [N, T] or [N, 1]
    ratio = torch.exp(logprobs - old_logprobs)  # [N, T]
    return -sequence_mean(adv * ratio, mask) - entropy_coef * _entropy_surrogate(logprobs, mask)


def critique_refinement_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, gamma: float = 0.1, entropy_coef: float = 0.001, **_: float
) -> torch.Tensor:
    """Critique-GRPO on the refinement in the buffer: -mean_t A f(pi) with f(p) = p / (p + gamma)
    (no ratio: the refinement is treated as off-policy), minus the entropy term. Shapes as
    critique_onpolicy_loss."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    shaped = refinement_shaping(torch.exp(logprobs), gamma)  # [N, T]
    return -sequence_mean(adv * shaped, mask) - entropy_coef * _entropy_surrogate(logprobs, mask)


LOSSES["critique"] = critique_onpolicy_loss
LOSSES["critique_refinement"] = critique_refinement_loss


def tree_values(leaf_rewards: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """SPO-Tree node values: leaf = its reward, interior node = the mean of its leaves.
    leaf_rewards [prod(shape)] in depth-first order -> values per depth d = 1..len(shape), each
    [prod(shape[:d])] (the last one the leaves themselves)."""
    n = 1
    for k in shape:
        n *= k
    if leaf_rewards.numel() != n:
        raise ValueError(f"tree_values: {leaf_rewards.numel()} leaves for shape {shape} (need {n})")
    out, width = [], 1
    for k in shape:
        width *= k
        out.append(leaf_rewards.reshape(width, -1).mean(-1))  # [width]: mean over each node's leaves
    return out


def tree_advantages(leaf_rewards: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """SPO-Tree node advantages: a node's value minus the mean value of its siblings (itself
    included), no std. With shape (2, 4): depth-1 nodes get (V_a - V_b) / 2 and -(V_a - V_b) / 2,
    leaves R - the mean of their 4 siblings. Same layout as tree_values."""
    out = []
    for d, values in enumerate(tree_values(leaf_rewards, shape)):
        sib = values.reshape(-1, shape[d])  # [parents, k]
        out.append((sib - sib.mean(-1, keepdim=True)).reshape(-1))
    return out


def probability_mask_credits(credits: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """SPO's token mask: only tokens with pi_old < threshold are trained, and a sequence's kept
    tokens are rescaled so its loss is a mean over them (T_i / kept_i on a loss that averages over
    all T_i active tokens; a positive scale commutes with the PPO clip). credits, old_logprobs,
    mask [N, T] -> [N, T] (a sequence with no kept token gets 0)."""
    keep = (old_logprobs.exp() < threshold).to(credits.dtype) * mask  # [N, T]
    kept = keep.sum(-1, keepdim=True)  # [N, 1]
    scale = torch.where(kept > 0, mask.sum(-1, keepdim=True) / kept.clamp(min=1), torch.zeros_like(kept))
    return credits * keep * scale
