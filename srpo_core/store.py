"""Artifact and checkpoint store: one interface, a local-directory backend and an S3 backend.

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
    at a step that has no manifest, so ``latest`` only ever names complete checkpoints.

This module must stay light (no torch): it is imported by small Metaflow steps.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

ENV_ROOT = "SRPO_ARTIFACT_ROOT"
ENV_S3_ENDPOINT = "SRPO_S3_ENDPOINT_URL"
ENV_GIT_COMMIT = "SRPO_GIT_COMMIT"
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

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Create immutable ``key`` with ``data`` (same content again: no-op)."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> StoredObject:
        """Create immutable ``key`` from a local file (same content again: no-op)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Content of ``key``; KeyNotFoundError if absent."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Download ``key`` to local ``path`` atomically; returns the path."""

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


# ---------------------------------------------------------------------------------- local store


@dataclass(frozen=True)
class LocalStore(Store):
    """Store rooted in a local directory. Writes go through a temp file and os.replace/os.link."""

    root: Path

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _versions_dir(self, name: str) -> Path:
        return self.root.joinpath(_LOCAL_VERSIONS_DIR, *validate_key(name, what="pointer name").split("/"))

    # -- immutable writes
    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        _validate_data_key(key)
        return self._put(key, sha256_bytes(data), len(data), lambda: iter([data]))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> StoredObject:
        _validate_data_key(key)
        sha, size = sha256_file(path)
        return self._put(key, sha, size, lambda: _iter_file(Path(path)))

    def _put(self, key: str, sha: str, size: int, chunks) -> StoredObject:
        dest = self._path(key)
        if dest.exists():
            self._check_same(key, dest, sha)
            return StoredObject(key, sha, size)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{_TMP_MARK}{uuid.uuid4().hex}-{dest.name}"
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks():
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            self._publish(key, tmp, dest, sha)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(key, sha, size)

    def _publish(self, key: str, tmp: Path, dest: Path, sha: str) -> None:
        """Create ``dest`` from ``tmp`` only if it does not exist (os.link is atomic create-if-absent)."""
        try:
            os.link(tmp, dest)
        except FileExistsError:
            self._check_same(key, dest, sha)
        except OSError:  # filesystem without hard links: check, then atomic replace
            if dest.exists():
                self._check_same(key, dest, sha)
            else:
                os.replace(tmp, dest)

    def _check_same(self, key: str, dest: Path, sha: str) -> None:
        existing, _ = sha256_file(dest)
        if existing != sha:
            raise ImmutableKeyError(
                f"key {key!r} already exists in {self.root} with different content "
                f"(stored sha256 {existing}, new {sha}); keys are immutable"
            )

    # -- reads
    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFoundError(f"key not found: {self.describe(key)}") from None

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        validate_key(key)
        src, dest = self._path(key), Path(path)
        if not src.is_file():
            raise KeyNotFoundError(f"key not found: {self.describe(key)}")
        _atomic_write_local(dest, _iter_file(src))
        return dest

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._path(key).is_file()

    def discard(self, key: str) -> None:
        validate_key(key)
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            _validate_prefix(prefix)
        base_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(base_key) if base_key else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".srpo")]
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    # -- pointers
    def set_pointer(self, name: str, value: str) -> str | None:
        data = value.encode("utf-8")
        version_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        _atomic_write_local(self._versions_dir(name) / version_id, iter([data]))
        _atomic_write_local(self._path(self.pointer_key(name)), iter([data]))
        return version_id

    def get_pointer(self, name: str, *, version_id: str | None = None) -> str:
        if version_id is None:
            path = self._path(self.pointer_key(name))
        else:
            path = self._versions_dir(name) / validate_key(version_id, what="version id")
        try:
            return path.read_text("utf-8")
        except FileNotFoundError:
            what = f"version {version_id!r} of pointer" if version_id else "pointer"
            raise KeyNotFoundError(f"{what} {name!r} not found in {self.root}") from None

    def get_pointer_versions(self, name: str) -> tuple[PointerVersion, ...]:
        vdir = self._versions_dir(name)
        if not vdir.is_dir():
            return ()
        names = (p.name for p in vdir.iterdir() if p.is_file() and not p.name.startswith(_TMP_MARK))
        ids = sorted(names, reverse=True)
        return tuple(
            PointerVersion(
                name=name,
                version_id=vid,
                last_modified=datetime.fromtimestamp(int(vid.split("-")[0]) / 1e9, tz=timezone.utc),
                is_latest=i == 0,
            )
            for i, vid in enumerate(ids)
        )

    def check_reachable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_MARK}probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreUnreachableError(f"artifact root {self.root} is not writable: {exc}") from exc


# ------------------------------------------------------------------------------------- S3 store


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _s3_endpoint_from_env() -> str | None:
    for var in (ENV_S3_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


@dataclass(frozen=True)
class S3Store(Store):
    """Store rooted at ``s3://bucket/prefix`` on AWS S3 or any S3-compatible endpoint.

    Immutable writes send ``If-None-Match: *`` (after a HEAD check, for servers that ignore the
    header) and record the content sha256 in the object metadata. Files above
    ``multipart_threshold`` bytes are uploaded in ``part_size`` parts with a conditional complete.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold: int = 256 * 1024 * 1024
    part_size: int = 64 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 5

    @classmethod
    def from_uri(cls, uri: str, **kwargs: Any) -> S3Store:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"S3 URI {uri!r} has no bucket")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix, what="S3 prefix")
        kwargs.setdefault("endpoint_url", _s3_endpoint_from_env())
        kwargs.setdefault("region", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
        return cls(bucket=bucket, prefix=prefix, **kwargs)

    @property
    def uri(self) -> str:
        return _join(f"s3://{self.bucket}", self.prefix)

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 default endpoint ({self._client.meta.endpoint_url})"

    def __getstate__(self) -> dict[str, Any]:  # boto3 clients do not pickle (Metaflow artifacts)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- clients
    def _make_client(self, *, connect_timeout: float, read_timeout: float, max_attempts: int):
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint_url else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1", config=config
        )

    @functools.cached_property
    def _client(self):
        return self._make_client(
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout, max_attempts=self.max_attempts
        )

    def _full(self, key: str) -> str:
        return _join(self.prefix, key)

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_name}"

    def _translate(self, exc: Exception, key: str | None = None) -> StoreError:
        """Map a botocore exception to a StoreError naming the key / bucket / endpoint."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        if isinstance(exc, NoCredentialsError):
            return StoreUnreachableError(f"no AWS credentials found for {self._where()}: {exc}")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return StoreUnreachableError(f"S3 endpoint {self.endpoint_name} is unreachable: {exc}")
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code == "NoSuchBucket":
                return StoreUnreachableError(f"S3 {self._where()} does not exist")
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchVersion"):
                return KeyNotFoundError(f"key not found: {self.describe(key or '')}")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                where = self.describe(key or "")
                return StoreUnreachableError(f"access denied to {where} ({self._where()}): {exc}")
        return StoreError(f"S3 operation on {self.describe(key or '')} ({self._where()}) failed: {exc}")

    def _call(self, method: str, key: str | None = None, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, key) from exc

    # -- immutable writes
    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        _validate_data_key(key)
        sha = sha256_bytes(data)
        return self._put(key, sha, len(data), lambda cond: self._put_object(key, io.BytesIO(data), sha, cond))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> StoredObject:
        _validate_data_key(key)
        sha, size = sha256_file(path)
        if size > self.multipart_threshold:
            upload = lambda cond: self._multipart_upload(key, Path(path), sha, cond)  # noqa: E731
        else:
            upload = lambda cond: self._put_file_object(key, Path(path), sha, cond)  # noqa: E731
        return self._put(key, sha, size, upload)

    def _put(self, key: str, sha: str, size: int, upload) -> StoredObject:
        """HEAD check, then a conditional upload; a lost race with the same content is a no-op."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.exists(key):
            self._check_same(key, sha)
            return StoredObject(key, sha, size)
        try:
            try:
                upload(True)
            except ClientError as exc:
                if _error_code(exc) not in ("NotImplemented", "501"):
                    raise
                upload(False)  # server without conditional writes: the HEAD check above must do
        except ClientError as exc:
            if _error_code(exc) not in ("PreconditionFailed", "412"):
                raise self._translate(exc, key) from exc
            self._check_same(key, sha)
        except BotoCoreError as exc:
            raise self._translate(exc, key) from exc
        return StoredObject(key, sha, size)

    def _put_file_object(self, key: str, path: Path, sha: str, conditional: bool) -> None:
        with open(path, "rb") as fh:
            self._put_object(key, fh, sha, conditional)

    def _put_object(self, key: str, body: BinaryIO, sha: str, conditional: bool) -> None:
        extra = {"IfNoneMatch": "*"} if conditional else {}
        self._client.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=body, Metadata={"sha256": sha}, **extra
        )

    def _multipart_upload(self, key: str, path: Path, sha: str, conditional: bool) -> None:
        full = self._full(key)
        created = self._client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata={"sha256": sha})
        upload_id = created["UploadId"]
        try:
            parts = []
            with open(path, "rb") as fh:
                for number, chunk in enumerate(iter(lambda: fh.read(self.part_size), b""), start=1):
                    resp = self._client.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            extra = {"IfNoneMatch": "*"} if conditional else {}
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}, **extra
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise

    def _stored_sha(self, key: str) -> str:
        head = self._call("head_object", key, Key=self._full(key))
        sha = head.get("Metadata", {}).get("sha256")
        if sha:
            return sha
        body = self._call("get_object", key, Key=self._full(key))["Body"]
        digest = hashlib.sha256()
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    def _check_same(self, key: str, sha: str) -> None:
        existing = self._stored_sha(key)
        if existing != sha:
            raise ImmutableKeyError(
                f"key {key!r} already exists in {self.uri} with different content "
                f"(stored sha256 {existing}, new {sha}); keys are immutable"
            )

    # -- reads
    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        return self._call("get_object", key, Key=self._full(key))["Body"].read()

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        validate_key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:  # s3transfer downloads to a temp name and renames: atomic
            self._client.download_file(self.bucket, self._full(key), str(dest))
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, key) from exc
        return dest

    def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            self._call("head_object", key, Key=self._full(key))
        except KeyNotFoundError:
            return False
        return True

    def discard(self, key: str) -> None:  # a versioned bucket keeps the old version
        validate_key(key)
        self._call("delete_object", key, Key=self._full(key))

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        if prefix:
            _validate_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        full = self._full(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        keys = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, prefix) from exc
        return sorted(keys)

    # -- pointers
    def set_pointer(self, name: str, value: str) -> str | None:
        key = self.pointer_key(name)
        data = value.encode("utf-8")
        meta = {"sha256": sha256_bytes(data)}
        resp = self._call("put_object", key, Key=self._full(key), Body=data, Metadata=meta)
        version = resp.get("VersionId")
        return None if version in (None, "null") else version

    def get_pointer(self, name: str, *, version_id: str | None = None) -> str:
        key = self.pointer_key(name)
        extra = {"VersionId": version_id} if version_id else {}
        try:
            resp = self._call("get_object", key, Key=self._full(key), **extra)
        except KeyNotFoundError:
            what = f"version {version_id!r} of pointer" if version_id else "pointer"
            raise KeyNotFoundError(f"{what} {name!r} not found in {self.uri} ({self._where()})") from None
        return resp["Body"].read().decode("utf-8")

    def get_pointer_versions(self, name: str) -> tuple[PointerVersion, ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(self.pointer_key(name))
        versions = []
        try:
            pages = self._client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                versions.extend(v for v in page.get("Versions", []) if v["Key"] == full)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, self.pointer_key(name)) from exc
        versions.sort(key=lambda v: (v.get("IsLatest", False), v["LastModified"]), reverse=True)
        return tuple(
            PointerVersion(
                name=name, version_id=v["VersionId"], last_modified=v["LastModified"], is_latest=v["IsLatest"]
            )
            for v in versions
        )

    def check_reachable(self, timeout: float = 2.0) -> None:
        """HEAD the bucket with a short connect timeout and no retries."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        client = self._make_client(connect_timeout=timeout, read_timeout=timeout + 1, max_attempts=1)
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreUnreachableError(f"S3 {self._where()} does not exist") from exc
            if code in ("403", "AccessDenied"):
                raise StoreUnreachableError(f"S3 {self._where()}: access denied (check credentials)") from exc
            raise StoreUnreachableError(f"S3 {self._where()} is not usable: {exc}") from exc
        except NoCredentialsError as exc:
            raise StoreUnreachableError(f"no AWS credentials found for S3 {self._where()}") from exc
        except BotoCoreError as exc:
            raise StoreUnreachableError(
                f"S3 endpoint {self.endpoint_name} (bucket {self.bucket!r}) is unreachable: {exc}"
            ) from exc


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
) -> StepManifest:
    """Upload ``local_dir`` as step ``step`` and write its manifest (idempotent on retry). The
    manifest is the commit point: keys under a step that has none were left by an attempt that
    died while uploading (different timings, or a non-deterministic GPU step), so they are
    discarded first and a rerun of the step can commit; a committed step's keys never change."""
    if (Path(local_dir) / MANIFEST_NAME).exists():
        raise ValueError(f"{local_dir}/{MANIFEST_NAME} would clash with the step manifest")
    prefix = step_prefix(training_id, step)
    if not store.exists(manifest_key(training_id, step)):
        for key in store.list(prefix + "/"):
            store.discard(key)
    files = store.put_dir(prefix, local_dir)
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


def set_latest_step(store: Store, training_id: str, step: int) -> str | None:
    """Point ``runs/{training_id}/latest`` at a step; refuses steps without a manifest."""
    if not store.exists(manifest_key(training_id, step)):
        raise KeyNotFoundError(
            f"refusing to point latest at {store.describe(step_prefix(training_id, step))}: it has no manifest"
        )
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
