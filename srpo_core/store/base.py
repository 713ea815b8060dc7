"""The store interface: errors, key rules, and the abstract `Store` every backend implements
(see srpo_core/store/__init__.py for the contract). No torch, no boto3 at import."""

from __future__ import annotations

import abc
import fnmatch
import hashlib
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ENV_ROOT = "SRPO_ARTIFACT_ROOT"
ENV_S3_ENDPOINT = "SRPO_S3_ENDPOINT_URL"
ENV_GIT_COMMIT = "SRPO_GIT_COMMIT"
ENV_FAULT = "SRPO_FAULT"  # fault injection for tests (see fault_point)
ENV_FAULT_DIR = "SRPO_FAULT_DIR"
DEFAULT_ROOT_NAME = "srpo_artifacts"

POINTER_NAMESPACE = "pointers"
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1

_CHUNK = 1 << 20
_TMP_MARK = ".srpo-tmp-"
_LOCAL_VERSIONS_DIR = ".srpo_pointer_versions"
_STEP_RE = re.compile(r"^runs/(?P<tid>[^/]+)/steps/(?P<step>\d{6,})$")
_TRAINING_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


# --------------------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every error raised by this module."""


class InvalidKeyError(StoreError, ValueError):
    """A key, prefix or pointer name is malformed or lies in a reserved namespace."""


class KeyNotFoundError(StoreError, LookupError):
    """A key, prefix, pointer or pointer version does not exist."""


class ImmutableKeyError(StoreError):
    """An existing immutable key was written with different content."""


class StoreUnreachableError(StoreError, ConnectionError):
    """The storage endpoint cannot be reached, or the bucket does not exist / is not accessible."""


class CheckpointIntegrityError(StoreError):
    """Downloaded checkpoint files do not match their manifest (corrupt or missing files)."""

    def __init__(self, message: str, *, corrupt: Sequence[str] = (), missing: Sequence[str] = ()):
        super().__init__(message)
        self.corrupt = tuple(corrupt)
        self.missing = tuple(missing)


# ---------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class StoredObject:
    """What a put returns: the full key, its sha256 and its size in bytes."""

    key: str
    sha256: str
    size: int


@dataclass(frozen=True)
class PointerVersion:
    """One version of a pointer, newest first in :meth:`Store.get_pointer_versions`."""

    name: str
    version_id: str
    last_modified: datetime
    is_latest: bool



# ------------------------------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Streamed sha256 and size of a local file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def validate_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a clean relative ``/``-separated name, else raise InvalidKeyError."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"{what} must be a non-empty string, got {key!r}")
    if key.startswith("/") or key.endswith("/") or "\\" in key:
        raise InvalidKeyError(f"{what} {key!r} must be relative, '/'-separated, without a trailing '/'")
    if any(ord(c) < 32 for c in key):
        raise InvalidKeyError(f"{what} {key!r} contains control characters")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(f"{what} {key!r} has an empty, '.' or '..' segment")
        if part.startswith(".srpo"):
            raise InvalidKeyError(f"{what} {key!r}: segments starting with '.srpo' are reserved")
    return key


def _validate_data_key(key: str) -> str:
    validate_key(key)
    if key == POINTER_NAMESPACE or key.startswith(POINTER_NAMESPACE + "/"):
        raise InvalidKeyError(
            f"key {key!r} lies in the reserved '{POINTER_NAMESPACE}/' namespace; use set_pointer()"
        )
    return key


def _check_put(key: str) -> None:
    """What every immutable write checks first: a data key outside the pointer namespace, then
    the fault point (tests/test_faults.py)."""
    _validate_data_key(key)
    fault_point("put", key)


def _validate_prefix(prefix: str) -> str:
    return "" if prefix == "" else validate_key(prefix.rstrip("/"), what="prefix")


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every regular file below ``local_dir``, sorted."""
    if not local_dir.is_dir():
        raise FileNotFoundError(f"local directory {str(local_dir)!r} does not exist")
    out = []
    for dirpath, _dirs, files in os.walk(local_dir):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file():
                out.append((path.relative_to(local_dir).as_posix(), path))
    return sorted(out)


def _atomic_write_local(dest: Path, chunks: Iterator[bytes]) -> None:
    """Write ``chunks`` to ``dest`` through a temp file in the same directory + os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{_TMP_MARK}{uuid.uuid4().hex}-{dest.name}"
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fault_point(op: str, key: str) -> None:
    """Fault injection for the fault suite (tests/test_faults.py), off unless `$SRPO_FAULT` is
    `<action>:<op>:<key glob>` and a write of kind `op` (`put`: an immutable key; `pointer`: a
    pointer, matched as `<name>=<value>`) is about to create a key matching the glob:

    * `kill`  -- SIGKILL this process's whole process group (the training, like `kill -9`),
    * `pause` -- create `$SRPO_FAULT_DIR/paused` and wait until `$SRPO_FAULT_DIR/go` exists (the
      test stops a server meanwhile), then go on with the write.
    """
    spec = os.environ.get(ENV_FAULT, "")
    if not spec:
        return
    action, _, rest = spec.partition(":")
    want_op, _, pattern = rest.partition(":")
    if want_op != op or not fnmatch.fnmatchcase(key, pattern):
        return
    if action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif action == "pause":
        folder = Path(os.environ[ENV_FAULT_DIR])
        (folder / "paused").write_text(f"{os.getpid()} {op} {key}\n")
        while not (folder / "go").exists():
            time.sleep(0.1)
    else:
        raise ValueError(f"${ENV_FAULT}={spec!r}: the action must be kill or pause")


def _iter_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from iter(lambda: fh.read(_CHUNK), b"")


# ------------------------------------------------------------------------------------ interface


class Store(abc.ABC):
    """Common interface of the local and S3 backends. Keys are relative to the store root."""

    # -- backend primitives
    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The root this store was opened on (``/abs/dir`` or ``s3://bucket/prefix``)."""

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Create immutable ``key`` with ``data`` (same content again: no-op)."""
        _check_put(key)
        return self._put_bytes(key, data, sha256_bytes(data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> StoredObject:
        """Create immutable ``key`` from a local file (same content again: no-op)."""
        _check_put(key)
        sha, size = sha256_file(path)
        return self._put_file(key, Path(path), sha, size)

    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes, sha: str) -> StoredObject:
        """put_bytes after its checks: ``key`` is a data key, ``sha`` the sha256 of ``data``."""

    @abc.abstractmethod
    def _put_file(self, key: str, path: Path, sha: str, size: int) -> StoredObject:
        """put_file after its checks: ``key`` is a data key, ``sha`` and ``size`` the file's."""

    def _stored_sha(self, key: str) -> str:
        """stored_sha256 of a checked ``key``: here a download, a backend's own where it has a cheaper way."""
        return sha256_bytes(self.get_bytes(key))

    def _check_same(self, key: str, sha: str) -> None:
        """An immutable ``key`` that exists already: the same content (sha256 ``sha``) is a no-op, other content an error."""
        existing = self._stored_sha(key)
        if existing != sha:
            raise ImmutableKeyError(f"key {key!r} already exists in {self.uri} with different content (stored sha256 {existing}, new {sha}); keys are immutable")

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Content of ``key``; KeyNotFoundError if absent."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Download ``key`` to local ``path`` atomically; returns the path."""

    def stored_sha256(self, key: str) -> str:
        """sha256 of what is stored at ``key`` now (backends answer without a download where they can)."""
        return self._stored_sha(validate_key(key))

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with the string ``prefix`` (S3 semantics)."""

    @abc.abstractmethod
    def discard(self, key: str) -> None:
        """Remove ``key`` (absent: no-op). Only for keys no manifest commits: the uploads of a step
        attempt that died before its manifest (see save_step); committed keys stay immutable."""

    @abc.abstractmethod
    def set_pointer(self, name: str, value: str) -> str | None:
        """Overwrite pointer ``name``; returns the new version id (None if unversioned)."""

    @abc.abstractmethod
    def get_pointer(self, name: str, *, version_id: str | None = None) -> str:
        """Current (or the given older) value of pointer ``name``; KeyNotFoundError if absent."""

    @abc.abstractmethod
    def get_pointer_versions(self, name: str) -> tuple[PointerVersion, ...]:
        """All versions of pointer ``name``, newest first (empty if it never existed)."""

    @abc.abstractmethod
    def check_reachable(self) -> None:
        """Fail fast with StoreUnreachableError naming the location when it is unusable."""

    # -- generic operations
    def put_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> tuple[StoredObject, ...]:
        """Upload every file below ``local_dir`` to ``prefix/<relative path>`` (e.g. a PEFT adapter)."""
        prefix = _validate_prefix(prefix)
        files = _local_files(Path(local_dir))
        if not files:
            raise ValueError(f"refusing to upload empty directory {str(local_dir)!r} to {prefix!r}")
        return tuple(self.put_file(_join(prefix, rel), path) for rel, path in files)

    def get_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Download every key under ``prefix/`` into ``local_dir``, keeping relative paths."""
        prefix = validate_key(prefix.rstrip("/"), what="prefix")
        keys = self.list(prefix + "/")
        if not keys:
            raise KeyNotFoundError(f"nothing stored under {self.describe(prefix + '/')}")
        dest = Path(local_dir)
        return tuple(self.get_file(k, dest / k[len(prefix) + 1 :]) for k in keys)

    def describe(self, key: str = "") -> str:
        """Human-readable location of ``key`` for error messages."""
        return _join(self.uri.rstrip("/"), key)

    @staticmethod
    def pointer_key(name: str) -> str:
        return _join(POINTER_NAMESPACE, validate_key(name, what="pointer name"))


