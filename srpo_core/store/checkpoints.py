"""The checkpoint layout of a training in a store: step prefixes and manifests (the commit point
of a step), save/load/verify of a step directory, the `latest` pointer, and the keys the flow's
phases use for their work and evaluation outcomes."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from srpo_core.store.base import (  # noqa: F401
    _STEP_RE,
    _TRAINING_ID_RE,
    ENV_GIT_COMMIT,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    CheckpointIntegrityError,
    ImmutableKeyError,
    InvalidKeyError,
    KeyNotFoundError,
    Store,
    StoredObject,
    StoreError,
    _local_files,
    sha256_bytes,
    sha256_file,
)
from srpo_core.store.lease import Lease


@dataclass(frozen=True)
class FileRecord:
    """A file of a step: path relative to the step prefix, sha256 and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CodeVersion:
    """The code that produced a checkpoint."""

    git_commit: str | None
    git_dirty: bool | None
    package_version: str


@dataclass(frozen=True)
class StepManifest:
    """Contents of ``runs/{training_id}/steps/{step:06d}/manifest.json``."""

    training_id: str
    step: int
    config_hash: str
    code_version: CodeVersion
    parent_key: str | None
    data_cursor: Any
    created_at: str
    files: tuple[FileRecord, ...]
    schema_version: int = MANIFEST_SCHEMA_VERSION

    @property
    def step_key(self) -> str:
        return step_prefix(self.training_id, self.step)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> StepManifest:
        raw = json.loads(text)
        return cls(
            training_id=raw["training_id"],
            step=int(raw["step"]),
            config_hash=raw["config_hash"],
            code_version=CodeVersion(**raw["code_version"]),
            parent_key=raw.get("parent_key"),
            data_cursor=raw.get("data_cursor"),
            created_at=raw["created_at"],
            files=tuple(FileRecord(**f) for f in raw["files"]),
            schema_version=int(raw.get("schema_version", MANIFEST_SCHEMA_VERSION)),
        )

    def same_content(self, other: StepManifest) -> bool:
        """Equal except for ``created_at`` (a retried write of the same checkpoint)."""
        return dataclasses.replace(self, created_at="") == dataclasses.replace(other, created_at="")



# ------------------------------------------------------------------------------ run-scoped keys


def _check_training_id(training_id: str) -> str:
    if not isinstance(training_id, str) or not _TRAINING_ID_RE.match(training_id):
        raise InvalidKeyError(f"training_id {training_id!r} must match {_TRAINING_ID_RE.pattern}")
    return training_id


def step_prefix(training_id: str, step: int) -> str:
    """``runs/{training_id}/steps/{step:06d}``."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"runs/{_check_training_id(training_id)}/steps/{int(step):06d}"


def manifest_key(training_id: str, step: int) -> str:
    return f"{step_prefix(training_id, step)}/{MANIFEST_NAME}"


def latest_pointer_name(training_id: str) -> str:
    """Name of the pointer to the newest complete checkpoint of a training run."""
    return f"runs/{_check_training_id(training_id)}/latest"


def parse_step_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`step_prefix`: ``(training_id, step)``."""
    match = _STEP_RE.match(key.rstrip("/"))
    if not match:
        raise ValueError(f"{key!r} is not a step key of the form runs/<training_id>/steps/<NNNNNN>")
    return match["tid"], int(match["step"])



# ----------------------------------------------------------------------------------- manifests


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(canonical.encode("utf-8"))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> CodeVersion:
    """Git commit (``$SRPO_GIT_COMMIT`` overrides, e.g. in containers without .git) + package version."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        package_version = version("srpo")
    except PackageNotFoundError:
        from srpo_core import __version__ as package_version
    commit = os.environ.get(ENV_GIT_COMMIT) or _git("rev-parse", "HEAD")
    dirty = None
    if commit and not os.environ.get(ENV_GIT_COMMIT):
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return CodeVersion(git_commit=commit, git_dirty=dirty, package_version=package_version)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(
    store: Store,
    training_id: str,
    step: int,
    files: Sequence[StoredObject],
    *,
    config: Mapping[str, Any],
    parent_key: str | None = None,
    data_cursor: Any = None,
    code: CodeVersion | None = None,
) -> StepManifest:
    """Write ``manifest.json`` for a step whose ``files`` (from put_dir/put_file) are uploaded.

    Idempotent: if a manifest with identical content (ignoring ``created_at``) already exists it is
    returned unchanged; a different one raises ImmutableKeyError.
    """
    base = step_prefix(training_id, step) + "/"
    records = []
    for obj in files:
        if not obj.key.startswith(base) or obj.key == base + MANIFEST_NAME:
            raise ValueError(f"file {obj.key!r} is not a data file of step {base.rstrip('/')!r}")
        records.append(FileRecord(obj.key[len(base) :], obj.sha256, obj.size))
    if not records:
        raise ValueError(f"a manifest for {base.rstrip('/')!r} needs at least one file")
    manifest = StepManifest(
        training_id=training_id,
        step=int(step),
        config_hash=config_hash(config),
        code_version=code or code_version(),
        parent_key=parent_key,
        data_cursor=json.loads(json.dumps(data_cursor)),  # fail early on non-JSON cursors
        created_at=_utc_now(),
        files=tuple(sorted(records, key=lambda r: r.path)),
    )
    key = manifest_key(training_id, step)
    if store.exists(key):
        existing = StepManifest.from_json(store.get_bytes(key))
        if existing.same_content(manifest):
            return existing
        raise ImmutableKeyError(f"a different manifest already exists at {store.describe(key)}")
    store.put_bytes(key, manifest.to_json().encode("utf-8"))
    return manifest


def read_manifest(store: Store, training_id: str, step: int) -> StepManifest:
    key = manifest_key(training_id, step)
    try:
        return StepManifest.from_json(store.get_bytes(key))
    except KeyNotFoundError:
        raise KeyNotFoundError(
            f"no manifest at {store.describe(key)}: the checkpoint is missing or incomplete"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointIntegrityError(f"manifest {store.describe(key)} is unreadable: {exc}") from exc


def verify_files(manifest: StepManifest, local_dir: str | os.PathLike[str]) -> StepManifest:
    """Re-hash the files of ``manifest`` in ``local_dir``; raise naming every corrupt/missing file."""
    local = Path(local_dir)
    corrupt, missing, problems = [], [], []
    for rec in manifest.files:
        path = local.joinpath(*rec.path.split("/"))
        if not path.is_file():
            missing.append(rec.path)
            problems.append(f"  missing: {rec.path} (expected at {path})")
            continue
        sha, size = sha256_file(path)
        if sha != rec.sha256 or size != rec.size:
            corrupt.append(rec.path)
            problems.append(
                f"  corrupt: {rec.path} (sha256 {sha}, size {size}; "
                f"manifest says sha256 {rec.sha256}, size {rec.size})"
            )
    if problems:
        raise CheckpointIntegrityError(
            f"checkpoint {manifest.step_key} in {local} does not match its manifest:\n" + "\n".join(problems),
            corrupt=corrupt,
            missing=missing,
        )
    return manifest


def verify_step(store: Store, training_id: str, step: int, local_dir: str | os.PathLike[str]) -> StepManifest:
    """Read the step's manifest from ``store`` and verify the downloaded files in ``local_dir``."""
    return verify_files(read_manifest(store, training_id, step), local_dir)


def save_step(
    store: Store,
    training_id: str,
    step: int,
    local_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    parent_key: str | None = None,
    data_cursor: Any = None,
    lease: Lease | None = None,
) -> StepManifest:
    """Upload ``local_dir`` as step ``step`` and write its manifest (idempotent on retry). The
    manifest is the commit point: keys under a step that has none were left by an attempt that
    died while uploading (different timings, or a non-deterministic GPU step). They are
    discarded, so a rerun of the step can commit, only under the training's ``lease`` (checked
    first): another writer's uploads are never discarded; without a lease such keys are an
    error. After the upload every stored file is re-hashed against what was uploaded and the
    lease checked again, then the manifest is written: a manifest only ever describes the files
    stored under it. A committed step's keys never change."""
    if (Path(local_dir) / MANIFEST_NAME).exists():
        raise ValueError(f"{local_dir}/{MANIFEST_NAME} would clash with the step manifest")
    if lease is not None and lease.training_id != training_id:
        raise ValueError(f"the lease of training {lease.training_id!r} cannot commit steps of {training_id!r}")
    prefix = step_prefix(training_id, step)
    if not store.exists(manifest_key(training_id, step)):
        uncommitted = store.list(prefix + "/")
        if uncommitted and lease is None:
            raise StoreError(
                f"{store.describe(prefix)} holds {len(uncommitted)} uncommitted keys (e.g. {uncommitted[0]}) from an attempt "
                "that died before its manifest, or from another writer: only the holder of the training's lease may discard them"
            )
        if uncommitted:
            lease.check(store)  # fenced: never discard while another writer holds the training
            for key in uncommitted:
                store.discard(key)
    files = store.put_dir(prefix, local_dir)
    replaced = [obj.key for obj in files if store.stored_sha256(obj.key) != obj.sha256]
    if replaced:
        raise CheckpointIntegrityError(
            f"another writer replaced {', '.join(replaced)} in {store.describe(prefix)} during this upload; no manifest written",
            corrupt=replaced,
        )
    if lease is not None:
        lease.check(store)  # fenced: the manifest commits only the holder's files
    return write_manifest(
        store, training_id, step, files, config=config, parent_key=parent_key, data_cursor=data_cursor
    )


def load_step(store: Store, training_id: str, step: int, local_dir: str | os.PathLike[str]) -> StepManifest:
    """Download step ``step`` into ``local_dir`` and verify it against its manifest."""
    manifest = read_manifest(store, training_id, step)
    base = step_prefix(training_id, step)
    for rec in manifest.files:
        try:
            store.get_file(f"{base}/{rec.path}", Path(local_dir).joinpath(*rec.path.split("/")))
        except KeyNotFoundError:
            pass  # reported, with every other problem, by verify_files
    return verify_files(manifest, local_dir)


class LatestRegressionError(StoreError):
    """A move of ``latest`` to a step before the one it names."""


def set_latest_step(store: Store, training_id: str, step: int, *, lease: Lease | None = None) -> str | None:
    """Point ``runs/{training_id}/latest`` at a step. Refuses steps without a manifest and moves
    backwards (``latest`` only moves forward; the same step again is a no-op move), and, given the
    training's ``lease``, checks it is still held first."""
    if not store.exists(manifest_key(training_id, step)):
        raise KeyNotFoundError(
            f"refusing to point latest at {store.describe(step_prefix(training_id, step))}: it has no manifest"
        )
    current = get_latest_step(store, training_id)
    if current is not None and int(step) < current:
        raise LatestRegressionError(
            f"refusing to move latest of training {training_id!r} in {store.describe()} backwards, from step {current} to step {int(step)}"
        )
    if lease is not None:
        lease.check(store)
    return store.set_pointer(latest_pointer_name(training_id), step_prefix(training_id, step))


def get_latest_step(store: Store, training_id: str, *, version_id: str | None = None) -> int | None:
    """Step number ``latest`` points to, or None when the run has no checkpoint yet."""
    try:
        value = store.get_pointer(latest_pointer_name(training_id), version_id=version_id)
    except KeyNotFoundError:
        if version_id is not None:
            raise
        return None
    tid, step = parse_step_key(value)
    if tid != training_id:
        raise StoreError(f"pointer {latest_pointer_name(training_id)!r} names another run: {value!r}")
    return step



# ------------------------------------------------------------------ the flow's work and evaluation keys


def work_key(training_id: str, step: int, run_id: str, shard: int, phase: str, attempt: int = 0) -> str:
    """A shard's state after `phase` in one workflow run of epoch step `step` (run-scoped: a rerun
    of the step writes new keys, never over an earlier attempt's)."""
    return f"runs/{_check_training_id(training_id)}/work/{int(step):06d}/{run_id}/shard{shard:03d}/{phase}-a{attempt}.json"


def eval_key(training_id: str, at_step: int, run_id: str, benchmark: str) -> str:
    """Per-item evaluation outcomes of `benchmark` after `at_step` updates (0: before training)."""
    return f"runs/{_check_training_id(training_id)}/eval/{int(at_step):06d}/{run_id}/{benchmark}.jsonl"


def adapter_key(training_id: str, step: int) -> str:
    return f"{step_prefix(training_id, step)}/adapter"


def resume_point(store: Store, training_id: str, *, lease: Lease | None = None) -> int | None:
    """The last finished epoch step of a training (None: none yet). A step whose checkpoint is
    complete but whose `latest` move was interrupted is adopted (under `lease`, when given)."""
    latest = get_latest_step(store, training_id)
    nxt = 0 if latest is None else latest + 1
    if store.exists(manifest_key(training_id, nxt)):
        set_latest_step(store, training_id, nxt, lease=lease)
        return nxt
    return latest
