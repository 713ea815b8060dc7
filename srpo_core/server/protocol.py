"""The JSON wire format of the inference server: the plain types of `engine.base` as JSON objects.

Both ends are this module, so the client (`engine.remote.RemoteEngine`) and the server
(`server.app`) cannot drift. Floats go through Python's `json` (repr round-trip: log-probs arrive
bit-exact; -inf is written as `-Infinity`, which Python's `json` reads back).

Endpoints (all JSON; errors are `{"error": "..."}` with 400 bad request (a body field or a malformed
HTTP request; 431 for headers over the parser's limit), 401 missing or wrong bearer token, 403
adapter URI outside the artifact root, 404 unknown path, 405 wrong method, 409 adapter-version or
content-hash conflict, 413 body/request/adapter over a cap, 422 adapter not matching its step
manifest, 503 not ready, busy or failed, 500 internal error). Every endpoint but /health and /ready
needs `Authorization: Bearer <token>`; /ready without it answers only `{"ready": bool}`.

    GET  /health            -> {"status": "alive"}                         (process is up)
    GET  /ready             -> 200 {"ready": true, ...} | 503 {"ready": false, ...}  (model loaded)
    GET  /adapters          -> {"active": str, "base": str, "adapters": [{version, uri, sha256, loaded_at}]}
    POST /adapters/load     {uri, version, sha256} -> {"version", "sha256", "uri", "evicted": [...], "active", "manifest_verified"}
    POST /adapters/unload   {version}        -> {"unloaded": version, "active"}
    POST /encode            {texts: [str]}   -> {"ids": [[int]]}
    POST /encode_chat       {texts: [str]}   -> {"ids": [[int]]}
    POST /decode            {ids: [[int]]}   -> {"texts": [str]}
    POST /generate_thoughts {requests: [ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams,
                             adapter_version: str|null, adapter_sha256: str|null} -> {"adapter_version", "results": [[Rollout]]}
    POST /complete          {prompts: [[int]], max_tokens, sampling, adapter_version, adapter_sha256} -> {"adapter_version", "results": [Completion]}
    POST /teacher_force     {prompts: [[int]], responses: [[int]], temperature, adapter_version, adapter_sha256}
                            -> {"adapter_version", "results": [TokenScores]}

`adapter_version` in a request names the version the caller requires: the server answers 409 if it
does not hold it, and never serves another; `adapter_sha256` pins the content too (409 when the
held adapter of that version has another hash). Null means "whatever is active", and the response
says which version that was (every Rollout/Completion carries it too).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from srpo_core.engine.base import Completion, Rollout, SamplingParams, ThoughtLimits, ThoughtRequest, TokenScores

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_STOP_CHARS = 256


class ProtocolError(ValueError):
    """A request body does not match the protocol (HTTP 400)."""


def check_version(version: Any, what: str = "adapter_version") -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ProtocolError(f"{what} must be a string matching {VERSION_RE.pattern}, got {version!r}")
    return version


def check_sha256(value: Any, what: str = "sha256") -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise ProtocolError(f"{what} must be 64 lowercase hex digits (a sha256), got {str(value)[:80]!r}")
    return value


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"{what} must be a list of integers")
    return list(value)


def _obj(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _dataclass_from(cls, data: Any, what: str):
    data = _obj(data, what)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ProtocolError(f"{what}: unknown field(s) {sorted(unknown)} (known: {sorted(names)})")
    for f in dataclasses.fields(cls):  # each value of its default's type (bool is not an int here)
        if f.name not in data:
            continue
        value, kind = data[f.name], type(f.default)
        ok = (
            isinstance(value, str)
            if kind is str
            else (isinstance(value, int) and not isinstance(value, bool))
            if kind is int
            else (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        )
        if not ok:
            raise ProtocolError(f"{what}.{f.name} must be a{'n integer' if kind is int else ' finite number' if kind is float else ' string'}, got {str(value)[:80]!r}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ProtocolError(f"{what}: {exc}") from None


def _at_least(obj, what: str, minimum: dict[str, float]) -> None:
    for name, low in minimum.items():
        if getattr(obj, name) < low:
            raise ProtocolError(f"{what}.{name} must be >= {low}, got {getattr(obj, name)!r}")


# ---- requests ---------------------------------------------------------------------------------

def limits_to_json(limits: ThoughtLimits) -> dict:
    return dataclasses.asdict(limits)


def limits_from_json(data: Any) -> ThoughtLimits:
    limits = _dataclass_from(ThoughtLimits, data, "limits")
    _at_least(limits, "limits", {"max_thoughts": 1, "max_thought_tokens": 1, "max_response_tokens": 1, "max_model_len": 1})
    if not limits.stop or len(limits.stop) > MAX_STOP_CHARS:
        raise ProtocolError(f"limits.stop must be a non-empty string of at most {MAX_STOP_CHARS} characters")
    return limits


def sampling_to_json(sampling: SamplingParams) -> dict:
    return dataclasses.asdict(sampling)


def sampling_from_json(data: Any) -> SamplingParams:
    sampling = _dataclass_from(SamplingParams, data, "sampling")
    _at_least(sampling, "sampling", {"temperature": 0.0, "top_k": 0, "seed": 0})
    if not 0.0 < sampling.top_p <= 1.0:
        raise ProtocolError(f"sampling.top_p must be in (0, 1], got {sampling.top_p!r}")
    if sampling.seed >= 2**63:
        raise ProtocolError("sampling.seed must be < 2**63")
    return sampling


def request_to_json(req: ThoughtRequest) -> dict:
    return {"prompt_ids": list(req.prompt_ids), "n": req.n, "prefix_ids": list(req.prefix_ids), "prefix_spans": [list(s) for s in req.prefix_spans]}


def request_from_json(data: Any, i: int = 0) -> ThoughtRequest:
    what = f"requests[{i}]"
    data = _obj(data, what)
    unknown = set(data) - {"prompt_ids", "n", "prefix_ids", "prefix_spans"}
    if unknown:
        raise ProtocolError(f"{what}: unknown field(s) {sorted(unknown)}")
    n = data.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ProtocolError(f"{what}.n must be an integer >= 1")
    prefix_ids = tuple(_ints(data.get("prefix_ids", []), f"{what}.prefix_ids"))
    spans = data.get("prefix_spans", [])
    if not isinstance(spans, list) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in spans):
        raise ProtocolError(f"{what}.prefix_spans must be a list of [start, end] pairs")
    spans = [tuple(_ints(s, f"{what}.prefix_spans[{k}]")) for k, s in enumerate(spans)]
    if any(not 0 <= a <= b <= len(prefix_ids) for a, b in spans):
        raise ProtocolError(f"{what}.prefix_spans must be [start, end] with 0 <= start <= end <= len(prefix_ids) = {len(prefix_ids)}")
    return ThoughtRequest(prompt_ids=tuple(_ints(data.get("prompt_ids"), f"{what}.prompt_ids")), n=n, prefix_ids=prefix_ids, prefix_spans=tuple(spans))


def id_lists(value: Any, what: str) -> list[list[int]]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a list of lists of integers")
    return [_ints(v, f"{what}[{i}]") for i, v in enumerate(value)]


def check_token_range(rows, vocab_size: int, what: str) -> None:
    """Every id in every row is a token of the model: 0 <= id < vocab_size (else 400, never a
    device-side index error)."""
    for i, row in enumerate(rows):
        if row and (min(row) < 0 or max(row) >= vocab_size):
            bad = next(t for t in row if not 0 <= t < vocab_size)
            raise ProtocolError(f"{what}[{i}] holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def texts(value: Any, what: str = "texts") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ProtocolError(f"{what} must be a list of strings")
    return value


# ---- results ----------------------------------------------------------------------------------

def rollout_to_json(r: Rollout) -> dict:
    d = dataclasses.asdict(r)
    d["spans"] = [list(s) for s in r.spans]
    return d


def rollout_from_json(d: dict) -> Rollout:
    return Rollout(**{**d, "spans": [tuple(s) for s in d["spans"]]})


def completion_to_json(c: Completion) -> dict:
    return dataclasses.asdict(c)


def completion_from_json(d: dict) -> Completion:
    return Completion(**d)


def scores_to_json(s: TokenScores) -> dict:
    return dataclasses.asdict(s)


def scores_from_json(d: dict) -> TokenScores:
    return TokenScores(**d)
