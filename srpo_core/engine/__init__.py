"""Rollout engines behind one interface (base.RolloutEngine): Hugging Face (CPU/GPU) and vLLM."""

from srpo_core.engine.base import Completion, Rollout, RolloutEngine, SamplingParams, ThoughtLimits, ThoughtRequest, TokenScores

__all__ = ["Completion", "Rollout", "RolloutEngine", "SamplingParams", "ThoughtLimits", "ThoughtRequest", "TokenScores"]
