"""Artifact and checkpoint store: one interface (base.py), a local-directory backend (local.py), an S3
backend (s3.py) and the checkpoint layout of a training (checkpoints.py).

Roots
    ``open_store(root)`` picks the backend from ``root``, else from ``$SRPO_ARTIFACT_ROOT``, else
    ``./srpo_artifacts`` under the current working directory:

    * a path or ``file://`` URI -> :class:`LocalStore`
    * ``s3://bucket[/prefix]``  -> :class:`S3Store` (boto3). The endpoint comes from
      ``$SRPO_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``, so any
      S3-compatible server (MinIO, Ceph, moto, ...) works; credentials come from the usual
      boto3 chain.

Keys
    Keys are ``/``-separated relative names (``runs/<training_id>/steps/000010/adapter_model.safetensors``).
    Every key is **immutable**: writing an existing key with different content raises
    :class:`ImmutableKeyError`, writing the same content again is a no-op (so retries are
    idempotent). A step's files are committed by its manifest: ``save_step`` discards what an
    attempt that died before writing the manifest left under the step. The only overwritable
    objects are *pointers* (``set_pointer``), kept under the
    reserved ``pointers/`` namespace, e.g. the ``runs/<training_id>/latest`` pointer. On S3 with
    bucket versioning enabled every pointer value stays retrievable (``get_pointer_versions``);
    the local backend keeps the same history in ``.srpo_pointer_versions/``.

Checkpoints
    A step lives under ``runs/{training_id}/steps/{step:06d}/`` and carries a ``manifest.json``
    (:class:`StepManifest`) with the config hash, code version, parent checkpoint key, data cursor,
    creation time and the sha256 + size of every file. :func:`save_step` uploads a directory and
    writes its manifest, :func:`load_step` downloads it and :func:`verify_step` re-hashes it,
    raising :class:`CheckpointIntegrityError` naming each corrupt or missing file -- a broken
    checkpoint is never silently replaced by a fresh start. ``set_latest_step`` refuses to point
    at a step that has no manifest, so ``latest`` only ever names complete checkpoints, and
    refuses to move it backwards.

Leases (lease.py)
    One writer per training id: ``acquire_lease`` creates generation g+1 of
    ``runs/<training_id>/lease/`` (create-if-absent picks one winner), a second live writer is
    refused naming the holder (host, pid, start, Metaflow run); a dead holder's lease (same host
    and its pid gone, expired, or ``$SRPO_LEASE_TAKEOVER=1``) is taken over. ``save_step``
    discards a step's uncommitted keys only under the lease, and checks it again before the
    manifest; ``set_latest_step`` before moving ``latest``.

Fault injection
    ``$SRPO_FAULT`` (see ``base.fault_point``) kills or pauses a process when it is about to
    write a matching key: the fault suite's hook, off by default.

This module must stay light (no torch): it is imported by small Metaflow steps.
"""

from __future__ import annotations

import os
from pathlib import Path

from srpo_core.store.base import (  # noqa: F401  (the package's public names)
    _TMP_MARK,
    DEFAULT_ROOT_NAME,
    ENV_FAULT,
    ENV_FAULT_DIR,
    ENV_GIT_COMMIT,
    ENV_ROOT,
    ENV_S3_ENDPOINT,
    MANIFEST_NAME,
    POINTER_NAMESPACE,
    CheckpointIntegrityError,
    ImmutableKeyError,
    InvalidKeyError,
    KeyNotFoundError,
    PointerVersion,
    Store,
    StoredObject,
    StoreError,
    StoreUnreachableError,
    fault_point,
    sha256_bytes,
    sha256_file,
    validate_key,
)
from srpo_core.store.checkpoints import (  # noqa: F401
    CodeVersion,
    FileRecord,
    LatestRegressionError,
    StepManifest,
    adapter_key,
    code_version,
    config_hash,
    eval_key,
    get_latest_step,
    latest_pointer_name,
    load_step,
    manifest_key,
    parse_step_key,
    read_manifest,
    resume_point,
    save_step,
    set_latest_step,
    step_prefix,
    verify_files,
    verify_step,
    work_key,
    write_manifest,
)
from srpo_core.store.lease import (  # noqa: F401
    LEASE_ENV,
    TAKEOVER_ENV,
    TTL_ENV,
    Lease,
    LeaseHeldError,
    LeaseHolder,
    LeaseLostError,
    LeaseRecord,
    acquire_lease,
    current_lease,
    lease_key,
    takeover_reason,
)
from srpo_core.store.local import LocalStore
from srpo_core.store.s3 import S3Store

# ------------------------------------------------------------------------------------- opening


def default_root() -> str:
    """``$SRPO_ARTIFACT_ROOT``, else ``<cwd>/srpo_artifacts``."""
    return os.environ.get(ENV_ROOT) or str(Path.cwd() / DEFAULT_ROOT_NAME)


def open_store(root: str | os.PathLike[str] | None = None) -> Store:
    """Open the store at ``root`` (see module docstring for the resolution order)."""
    root = str(root) if root is not None else default_root()
    if root.startswith("s3://"):
        return S3Store.from_uri(root)
    if root.startswith("file://"):
        root = root[len("file://") :]
    elif "://" in root:
        raise ValueError(f"unsupported artifact root {root!r}: use a local path, file:// or s3://")
    return LocalStore(Path(root).expanduser().resolve())


