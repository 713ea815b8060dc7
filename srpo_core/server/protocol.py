"""The JSON wire format of the inference server: the plain types of `engine.base` as JSON objects.

Both ends are this module, so the client (`engine.remote.RemoteEngine`) and the server
(`server.app`) cannot drift. Floats go through Python's `json` (repr round-trip: log-probs arrive
bit-exact; -inf is written as `-Infinity`, which Python's `json` reads back).

Endpoints (all JSON; errors are `{"error": "..."}` with 400 bad request, 404 unknown path,
409 adapter-version conflict, 503 not ready, 500 internal error):

    GET  /health            -> {"status": "alive"}                         (process is up)
    GET  /ready             -> 200 {"ready": true, ...} | 503 {"ready": false, ...}  (model loaded)
    GET  /adapters          -> {"active": str, "base": str, "adapters": [{version, uri, sha256, loaded_at}]}
    POST /adapters/load     {uri, version}   -> {"version", "sha256", "uri", "evicted": [...], "active"}
    POST /adapters/unload   {version}        -> {"unloaded": version, "active"}
    POST /encode            {texts: [str]}   -> {"ids": [[int]]}
    POST /encode_chat       {texts: [str]}   -> {"ids": [[int]]}
    POST /decode            {ids: [[int]]}   -> {"texts": [str]}
    POST /generate_thoughts {requests: [ThoughtRequest], limits: ThoughtLimits, sampling: SamplingParams,
                             adapter_version: str|null} -> {"adapter_version", "results": [[Rollout]]}
    POST /complete          {prompts: [[int]], max_tokens, sampling, adapter_version} -> {"adapter_version", "results": [Completion]}
    POST /teacher_force     {prompts: [[int]], responses: [[int]], temperature, adapter_version}
                            -> {"adapter_version", "results": [TokenScores]}

`adapter_version` in a request names the version the caller requires: the server answers 409 if it
does not hold it, and never serves another. Null means "whatever is active", and the response says
which version that was (every Rollout/Completion carries it too).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from srpo_core.engine.base import Completion, Rollout, SamplingParams, ThoughtLimits, ThoughtRequest, TokenScores

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+-]{0,127}$")


class ProtocolError(ValueError):
    """A request body does not match the protocol (HTTP 400)."""


def check_version(version: Any, what: str = "adapter_version") -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ProtocolError(f"{what} must be a string matching {VERSION_RE.pattern}, got {version!r}")
    return version


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
    try:
        return cls(**data)
    except TypeError as exc:
        raise ProtocolError(f"{what}: {exc}") from None


# ---- requests ---------------------------------------------------------------------------------

def limits_to_json(limits: ThoughtLimits) -> dict:
    return dataclasses.asdict(limits)


def limits_from_json(data: Any) -> ThoughtLimits:
    return _dataclass_from(ThoughtLimits, data, "limits")


def sampling_to_json(sampling: SamplingParams) -> dict:
    return dataclasses.asdict(sampling)


def sampling_from_json(data: Any) -> SamplingParams:
    return _dataclass_from(SamplingParams, data, "sampling")


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
    spans = data.get("prefix_spans", [])
    if not isinstance(spans, list) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in spans):
        raise ProtocolError(f"{what}.prefix_spans must be a list of [start, end] pairs")
    return ThoughtRequest(
        prompt_ids=tuple(_ints(data.get("prompt_ids"), f"{what}.prompt_ids")), n=n,
        prefix_ids=tuple(_ints(data.get("prefix_ids", []), f"{what}.prefix_ids")),
        prefix_spans=tuple((int(a), int(b)) for a, b in spans),
    )  # fmt: skip


def id_lists(value: Any, what: str) -> list[list[int]]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a list of lists of integers")
    return [_ints(v, f"{what}[{i}]") for i, v in enumerate(value)]


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
