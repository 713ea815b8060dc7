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
