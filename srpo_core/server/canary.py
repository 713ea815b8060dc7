"""Weight-sync canary: after an adapter load, the server must score a fixed sequence like the learner.

    canary_check(server_engine, learner, "step-3")      # raises StaleAdapterError on a mismatch

The server scores the canary sequence under exactly `version` (a RemoteEngine names it, so a
server that does not hold it answers 409, also reported as StaleAdapterError); the learner scores it
in-process with its current LoRA. The check fails when

  * max |logp_server - logp_learner| > tol      (per token of the response), or
  * mean |logp_server - logp_learner| > mean_tol, or
  * `expected_sha256` is given and the server's adapter content hash differs (exact, any dtype).

Tolerances (defaults by the lower precision of the two ends; the server reports its dtype on /ready):

  float32 (CPU tests, tiny model):  tol 1e-4, mean_tol 1e-5. Same weights give ~1e-6 (different
      thread counts reorder float32 sums); one learner step at the tiny preset's lr moves them by
      far more, so a stale adapter cannot pass.
  bfloat16 (GPU, server bf16 vs learner bf16, or vLLM vs PEFT): tol 2.5e-1, mean_tol 2e-2. bf16 keeps
      8 mantissa bits (relative error 2^-9 per rounding), and logits of magnitude 10-30 carry an
      absolute rounding of ~0.05 at the last layer, so identical weights through different kernels
      (fused vs unfused LoRA, different reduction order, batch shapes) differ by ~1e-2 on average
      with tails near 0.1-0.2 on low-probability tokens. At the paper's lr (5e-5, r=64) one step
      may move log-probs by less than that noise, so in bf16 the log-prob check catches a wrong,
      missing or mis-scaled adapter, and the content hash (`expected_sha256`, e.g.
      `adapter_sha256(saved_dir)`) catches a stale one. Calibrate on the target GPU with
      bench/gpu_smoke.py, which prints the measured diffs.
  float16: tol 5e-2, mean_tol 5e-3.

The learner side is a `Learner` scored in-process through `HFEngine.teacher_force`, or a
`CanaryReference`: the learner's scores computed where the learner ran (`canary_reference`, called
on every process of an FSDP learner) and handed over, as the flow's learner step does.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

TOLERANCES = {"float32": (1e-4, 1e-5), "bfloat16": (2.5e-1, 2e-2), "float16": (5e-2, 5e-3)}
_PRECISION_ORDER = ("float32", "float16", "bfloat16")  # increasing tolerance


class StaleAdapterError(RuntimeError):
    """The server's adapter does not match the learner's (stale, missing or wrong weights)."""

    def __init__(self, message: str, version: str, max_abs_diff: float | None = None):
        super().__init__(message)
        self.version = version
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class CanaryResult:
    version: str
    max_abs_diff: float
    mean_abs_diff: float
    tol: float
    mean_tol: float
    n_tokens: int
    seconds: float


def canary_sequence(tokenizer, vocab_size: int | None = None, prompt_len: int = 16, response_len: int = 48, seed: int = 0) -> tuple[list[int], list[int]]:
    """A fixed pseudo-random token sequence over the non-special vocabulary (works for any tokenizer)."""
    n = min(len(tokenizer), vocab_size or len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = [i for i in range(n) if i not in special]
    rng = random.Random(seed)
    ids = [rng.choice(pool) for _ in range(prompt_len + response_len)]
    return ids[:prompt_len], ids[prompt_len:]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_tolerance(*dtypes: str | None) -> tuple[float, float]:
    names = [d for d in (_dtype_name(x) for x in dtypes if x) if d in TOLERANCES] or ["float32"]
    worst = max(names, key=_PRECISION_ORDER.index)
    return TOLERANCES[worst]


@dataclass(frozen=True)
class CanaryReference:
    """The learner's scores of the canary sequence (saved where the learner ran)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    dtype: str


def _learner_engine(learner):
    """A RolloutEngine scoring with the learner's in-process model (or `learner` itself if it is one)."""
    from srpo_core.engine.base import RolloutEngine

    if isinstance(learner, RolloutEngine):
        return learner, getattr(getattr(learner, "model", None), "dtype", None)
    from srpo_core.engine.hf import HFEngine

    return HFEngine(learner.model, learner.tokenizer), next(p for p in learner.model.parameters() if not p.requires_grad).dtype


def canary_reference(learner) -> CanaryReference:
    """Score the default canary sequence with the learner (a collective under FSDP: call on every process)."""
    ref, dtype = _learner_engine(learner)
    vocab = getattr(getattr(ref.model, "config", None), "vocab_size", None)
    prompt_ids, response_ids = canary_sequence(learner.tokenizer, vocab)
    scores = ref.teacher_force([prompt_ids], [response_ids], 1.0)[0]
    return CanaryReference(prompt_ids, response_ids, list(scores.logprobs), _dtype_name(dtype))


def canary_check(server_engine, learner, version: str, tol: float | None = None, *, mean_tol: float | None = None, expected_sha256: str | None = None) -> CanaryResult:
    """Compare the server's log-probs for a fixed sequence (under `version`) with the learner's.

    `server_engine`: a RemoteEngine or an OpenAIEngine (a stock vLLM server), copied and pinned to
    `version` (and to `expected_sha256`: our server checks the hash, a vLLM server serves the
    adapter under a name holding it), the caller's object is not changed; or any RolloutEngine. `learner`: a `Learner`, a `CanaryReference`, or a
    RolloutEngine used as the reference. Raises StaleAdapterError on a mismatch; returns the measured diffs."""
    from srpo_core.engine.openai_api import OpenAIEngine, adapter_name
    from srpo_core.engine.remote import AdapterVersionError, RemoteEngine

    t0 = time.perf_counter()
    own = learner if isinstance(learner, CanaryReference) else canary_reference(learner)
    prompt_ids, response_ids = own.prompt_ids, own.response_ids
    server_dtype = None
    eng = server_engine
    if isinstance(server_engine, RemoteEngine):
        eng = copy.copy(server_engine)
        eng.adapter_version = version
        eng.adapter_sha256 = expected_sha256  # pinned by content too: other weights under `version` are a 409
        try:
            info = eng.ready()
            server_dtype = info.get("dtype")
            if expected_sha256 is not None:
                held = {a["version"]: a["sha256"] for a in eng.adapters()["adapters"]}
                if held.get(version) != expected_sha256:
                    raise StaleAdapterError(
                        f"weight-sync canary: server {eng.url} holds {version!r} with sha256 {str(held.get(version))[:12]}, the learner's adapter is {expected_sha256[:12]}", version
                    )
            served = eng.teacher_force([prompt_ids], [response_ids], 1.0)[0]
        except AdapterVersionError as exc:
            raise StaleAdapterError(f"weight-sync canary: {exc}", version) from exc
    elif isinstance(server_engine, OpenAIEngine) and expected_sha256 is not None:
        eng = copy.copy(server_engine)
        name = adapter_name(version, expected_sha256)
        if name not in eng.adapters():
            raise StaleAdapterError(f"weight-sync canary: vLLM server {eng.url} does not serve {name!r} (the learner's adapter {expected_sha256[:12]} as {version!r})", version)
        eng.served_model, eng.adapter_version, eng.adapter_sha256 = name, version, expected_sha256
        try:
            served = eng.teacher_force([prompt_ids], [response_ids], 1.0)[0]
        except AdapterVersionError as exc:
            raise StaleAdapterError(f"weight-sync canary: {exc}", version) from exc
    else:
        served = eng.teacher_force([prompt_ids], [response_ids], 1.0)[0]
    d_tol, d_mean = default_tolerance(own.dtype, server_dtype)
    tol = d_tol if tol is None else tol
    mean_tol = (d_mean if tol == d_tol else tol / 10) if mean_tol is None else mean_tol
    diffs = [abs(a - b) for a, b in zip(served.logprobs, own.logprobs)]
    if len(served.logprobs) != len(own.logprobs) or not diffs or not all(math.isfinite(d) for d in diffs):
        raise StaleAdapterError(f"weight-sync canary for {version!r}: server returned {len(served.logprobs)} log-probs (non-finite or missing), learner {len(own.logprobs)}", version)
    max_d, mean_d = max(diffs), sum(diffs) / len(diffs)
    result = CanaryResult(version, max_d, mean_d, tol, mean_tol, len(diffs), time.perf_counter() - t0)
    if max_d > tol or mean_d > mean_tol:
        where = getattr(server_engine, "url", type(server_engine).__name__)
        raise StaleAdapterError(
            f"STALE ADAPTER: server {where} scores the canary under version {version!r} differently from the learner: "
            f"max |dlogp| = {max_d:.3g} (tol {tol:.3g}), mean = {mean_d:.3g} (tol {mean_tol:.3g}) over {len(diffs)} tokens. "
            "The server is not serving the learner's weights; do not sample with it.",
            version, max_d,
        )  # fmt: skip
    return result
