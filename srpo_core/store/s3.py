"""The S3 backend (boto3): conditional immutable writes, multipart uploads, versioned pointers;
any S3-compatible endpoint."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from srpo_core.store.base import (
    _CHUNK,
    ENV_S3_ENDPOINT,
    KeyNotFoundError,
    PointerVersion,
    Store,
    StoredObject,
    StoreError,
    StoreUnreachableError,
    _join,
    _validate_prefix,
    fault_point,
    sha256_bytes,
    validate_key,
)

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
    def _put_bytes(self, key: str, data: bytes, sha: str) -> StoredObject:
        return self._put(key, sha, len(data), lambda cond: self._put_object(key, io.BytesIO(data), sha, cond))

    def _put_file(self, key: str, path: Path, sha: str, size: int) -> StoredObject:
        if size > self.multipart_threshold:
            upload = lambda cond: self._multipart_upload(key, path, sha, cond)  # noqa: E731
        else:
            upload = lambda cond: self._put_file_object(key, path, sha, cond)  # noqa: E731
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
        fault_point("pointer", f"{name}={value}")
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


