"""The rollout-engine interface: plain Python types only (no torch, no Hugging Face types), so a
vLLM engine or an HTTP client for an inference server can stand behind it.

A thought-structured rollout is a chain of thoughts, each ending with the stop string (kept in
the text). Chain-end rules (SPEC 1, REFERENCE.md), checked after every thought:
  - the thought contains `\\boxed{`                              -> "answer"
  - `max_thoughts` thoughts                                      -> "max_thoughts"
  - response length + `max_thought_tokens` > `max_response_tokens` -> "max_response"
  - context length + `max_thought_tokens` > `max_model_len`        -> "max_model_len"
A thought that reaches `max_thought_tokens` without the stop string is cut there, kept without
its delimiter, and the chain goes on. An end-of-sequence token ends the chain ("eos") and is not
part of the response. Caps count the reset prefix: a suffix continues the seed's thought count
and response length.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

BOXED = "\\boxed{"  # a thought containing it ends the chain ("answer")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0


@dataclass(frozen=True)
class ThoughtLimits:
    stop: str = "</thought>"
    max_thoughts: int = 20
    max_thought_tokens: int = 256
    max_response_tokens: int = 4096
    max_model_len: int = 32768


@dataclass(frozen=True)
class ThoughtRequest:
    """Sample `n` chains from prompt + prefix. The prefix is a token-exact reset state: the
    seed's response tokens for thoughts 1..h*-1, with their spans (response indices)."""

    prompt_ids: tuple[int, ...]
    n: int = 1
    prefix_ids: tuple[int, ...] = ()
    prefix_spans: tuple[tuple[int, int], ...] = ()


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # prefix tokens (if any) followed by generated tokens
    prefix_len: int  # leading response tokens copied from the reset prefix (masked in the loss)
    spans: list[tuple[int, int]]  # [start, end) of each thought in response indices
    logprobs: list[float]  # per generated token (len = len(response_ids) - prefix_len), at the sampling temperature
    thoughts: list[str]
    text: str  # decoded response (prefix included)
    finish_reason: str
    adapter_version: str | None = None

    @property
    def generated_tokens(self) -> int:
        return len(self.response_ids) - self.prefix_len


@dataclass
class Completion:
    ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    adapter_version: str | None = None


@dataclass
class TokenScores:
    logprobs: list[float]  # log p(response token | context) at the given temperature
    greedy_ids: list[int]  # the policy's argmax at each response position


class RolloutEngine(abc.ABC):
    """What the rollout, localization and evaluation code needs from an inference backend."""

    adapter_version: str | None = None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_chat(self, text: str) -> list[int]:
        """The text as a single user turn in the model's chat template (plain encode if none)."""
        return self.encode(text)

    @abc.abstractmethod
    def generate_thoughts(self, requests: list[ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams) -> list[list[Rollout]]:
        """One list of `n` rollouts per request, in request order."""

    @abc.abstractmethod
    def complete(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams) -> list[Completion]:
        """Free-form completions (localization), ending at end-of-sequence or `max_tokens`."""

    @abc.abstractmethod
    def teacher_force(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0) -> list[TokenScores]:
        """Score given responses: per-token log-probs and the greedy choice at each position."""


def number_chains(seen: dict, seed: int, context: tuple[int, ...], n: int) -> int:
    """The index of the first of `n` new chains continuing `context` with sampling seed `seed`:
    `seen` counts the chains of each (seed, context) submitted so far, so equal contexts (in one
    submission, or across submissions sharing `seen`) get chains of their own."""
    first = seen.get((seed, context), 0)
    seen[(seed, context)] = first + n
    return first


class TokenizerText:
    """`encode` / `decode` / `encode_chat` over a Hugging Face tokenizer held in `self.tokenizer`:
    the engines whose model runs elsewhere (vLLM in process, a vLLM server over its OpenAI API)
    decode exactly as the HF engine does (special tokens skipped, no space clean-up)."""

    tokenizer = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode_chat(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return self.encode(text)


class ThoughtChains:
    """Per-row thought bookkeeping of the chain-end rules above (python lists; touched only at
    thought ends, which are rare next to tokens). Every engine ends chains by this one class; it
    needs only `engine.decode`."""

    def __init__(self, engine: "RolloutEngine", limits: ThoughtLimits, ctx_lens: list[int], prefixes: list[list[int]], prefix_spans: list[list[tuple[int, int]]]):
        self.engine, self.limits = engine, limits
        self.ctx_lens = ctx_lens  # prompt + prefix
        self.prefixes = prefixes
        self.spans = [list(s) for s in prefix_spans]
        self.thought_start = [len(p) for p in prefixes]  # response index where the open thought starts
        self.finish: list[str | None] = [None] * len(prefixes)
        for row in range(len(prefixes)):
            self.finish[row] = self._pre_thought_check(row, len(prefixes[row]))

    def _pre_thought_check(self, row: int, resp_len: int) -> str | None:
        lim = self.limits
        if len(self.spans[row]) >= lim.max_thoughts:
            return "max_thoughts"
        if resp_len + lim.max_thought_tokens > lim.max_response_tokens:
            return "max_response"
        if self.ctx_lens[row] - len(self.prefixes[row]) + resp_len + lim.max_thought_tokens > lim.max_model_len:
            return "max_model_len"
        return None

    def thought_text(self, row: int, generated: list[int], end: int) -> str:
        """The open thought's text: response[thought_start:end], response = prefix + generated."""
        prefix, start = self.prefixes[row], self.thought_start[row]
        ids = generated[start - len(prefix) : end - len(prefix)] if start >= len(prefix) else prefix[start:] + generated[: end - len(prefix)]
        return self.engine.decode(ids)

    def end_chain_at_eos(self, row: int, generated: list[int]) -> None:
        """Row `row` stopped at EOS after `generated` (the EOS token not in it): its open thought
        is closed where it stands (when it holds any token) and the chain ends with "eos"."""
        end = len(self.prefixes[row]) + len(generated)
        if end > self.thought_start[row]:
            self.spans[row].append((self.thought_start[row], end))
        self.finish[row] = "eos"

    def land(self, row: int, generated: list[int], eos: bool) -> None:
        """One thought call's tokens are in `generated`: the chain ends at EOS, or else the thought
        ends here (at the stop string, or at the thought cap, kept without its delimiter)."""
        if eos:
            self.end_chain_at_eos(row, generated)
        else:
            self.end_thought(row, generated, len(self.prefixes[row]) + len(generated))

    def rollouts(self, requests: list[ThoughtRequest], rows_req: list[int], generated: list[list[int]], logprobs: list[list[float]], adapter_version: str | None) -> list[list[Rollout]]:
        """The finished chains as Rollouts, grouped by request: row `row` continues
        `requests[rows_req[row]]` with the tokens `generated[row]` (after the request's prefix)."""
        out: list[list[Rollout]] = [[] for _ in requests]
        for row, i in enumerate(rows_req):
            out[i].append(self.rollout(requests[i], row, generated[row], logprobs[row], adapter_version))
        return out

    def rollout(self, request: ThoughtRequest, row: int, generated: list[int], logprobs: list[float], adapter_version: str | None) -> Rollout:
        """Row `row`'s finished chain, continuing `request` with the tokens `generated`."""
        response = list(request.prefix_ids) + generated
        spans = [tuple(s) for s in self.spans[row]]
        return Rollout(
            prompt_ids=list(request.prompt_ids), response_ids=response, prefix_len=len(request.prefix_ids), spans=spans, logprobs=logprobs,
            thoughts=[self.engine.decode(response[a:b]) for a, b in spans], text=self.engine.decode(response), finish_reason=self.finish[row], adapter_version=adapter_version,
        )  # fmt: skip

    def end_thought(self, row: int, generated: list[int], end: int, text: str | None = None) -> None:
        text = self.thought_text(row, generated, end) if text is None else text
        self.spans[row].append((self.thought_start[row], end))
        self.thought_start[row] = end
        self.finish[row] = "answer" if BOXED in text else self._pre_thought_check(row, end)
