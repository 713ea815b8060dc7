"""Where the inference server may read adapters from, and how: a private, verified copy.

    source = AdapterSource(["s3://bucket/srpo", "/data/srpo"], FetchLimits(max_bytes=2 << 30))
    fetched = source.fetch("s3://bucket/srpo/runs/t/steps/000003/adapter", dest_dir)

Contract (every rule holds before a byte of the adapter is read into the model):

* Roots. An adapter URI must lie under one of the server's artifact roots (`--artifact-root`, a
  local directory or an `s3://bucket[/prefix]`). A local URI must be absolute, without `..`
  segments, and its real path (symlinks resolved) must stay under the root's real path, for the
  directory and for every file in it; an s3:// key must start with the root's prefix and be a clean
  key (`store.validate_key`). A URI outside every root is refused (403) with the same message
  whether or not it exists, so the server cannot be used to probe paths.
* Size. The files are listed first (local: stat, S3: ListObjectsV2 sizes) and refused (413) when
  they exceed `max_files` or `max_bytes` in total; the copy then counts bytes and aborts when a file
  grows past its listed size, so nothing larger than the cap ever lands in the cache.
* Manifest (finding 8 of issue 16). When the adapter directory sits in a step checkpoint
  (`<step>/adapter` beside `<step>/manifest.json`, srpo_core/store.py's StepManifest), the copied
  files must be exactly the manifest's `adapter/...` records, each with its sha256 and size;
  anything else is refused (422) naming the files.
* Copy. The server always loads from its own copy in its cache directory (never from the source
  path), so what is hashed, verified and loaded is the same bytes.

The caller (server.app) then checks the content hash the client expects (`adapter_sha256`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20


class AdapterRefused(Exception):
    """An adapter URI the server will not load; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_sha256(path: str | os.PathLike) -> str:
    """Content hash of a PEFT adapter directory (config + weights), the same on both ends of a
    weight sync: the learner's saved dir and the server's downloaded copy."""
    root = Path(path)
    h = hashlib.sha256()
    found = False
    for name in ADAPTER_FILES:
        f = root / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    if not found:
        raise FileNotFoundError(f"{root} holds no PEFT adapter ({' / '.join(ADAPTER_FILES)})")
    return h.hexdigest()

@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 2 << 30  # LoRA r=64 on every linear layer of a 14B model is ~0.55 GB in bf16, ~1.1 GB in fp32
    max_files: int = 64

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_files < 1:
            raise ValueError(f"adapter fetch limits must be >= 1, got {self}")


@dataclass(frozen=True)
class FetchedAdapter:
    path: Path  # the server's private copy
    files: dict[str, tuple[str, int]]  # relative path -> (sha256, size) of the copy
    manifest: str | None  # where the step manifest that verified it lives, if any


@dataclass(frozen=True)
class ArtifactRoot:
    uri: str  # an absolute real path, or s3://bucket[/prefix] (no trailing '/')

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @classmethod
    def parse(cls, text: str) -> ArtifactRoot:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("an artifact root must be a non-empty path or s3:// URI")
        text = text.strip()
        if text.startswith("s3://"):
            from srpo_core.store import validate_key

            bucket, _, prefix = text[len("s3://") :].partition("/")
            prefix = prefix.strip("/")
            if not bucket:
                raise ValueError(f"artifact root {text!r} has no bucket")
            if prefix:
                validate_key(prefix, what="artifact root prefix")
            return cls(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
        if text.startswith("file://"):
            text = text[len("file://") :]
        elif "://" in text:
            raise ValueError(f"unsupported artifact root {text!r}: use a local directory, file:// or s3://")
        return cls(os.path.realpath(os.path.expanduser(text)))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class AdapterSource:
    def __init__(self, roots, limits: FetchLimits = FetchLimits()):
        self.roots = tuple(r if isinstance(r, ArtifactRoot) else ArtifactRoot.parse(r) for r in roots)
        self.limits = limits

    def describe(self) -> str:
        return ", ".join(r.uri for r in self.roots) or "(none: adapter loading is disabled)"

    def _refuse_outside(self, uri: str) -> AdapterRefused:
        # one message for every URI outside the roots: it must not tell whether the path exists
        return AdapterRefused(403, f"adapter uri {uri!r} is not under this server's artifact root(s) [{self.describe()}]; only adapters under them can be loaded")

    # ---- fetching -----------------------------------------------------------------------------
    def fetch(self, uri: str, dest: Path) -> FetchedAdapter:
        """Copy the adapter at `uri` into `dest` (which must not exist) and verify it."""
        if not isinstance(uri, str) or not uri:
            raise AdapterRefused(400, "uri must be a non-empty string")
        if not self.roots:
            raise AdapterRefused(403, "this server has no --artifact-root: adapter loading is disabled")
        if uri.startswith("s3://"):
            return self._fetch_s3(uri, dest)
        if "://" in uri and not uri.startswith("file://"):
            raise AdapterRefused(400, f"unsupported adapter uri scheme in {uri!r}: use a path, file:// or s3:// under the artifact root")
        return self._fetch_local(uri.removeprefix("file://"), uri, dest)

    def _fetch_local(self, path_text: str, uri: str, dest: Path) -> FetchedAdapter:
        if not os.path.isabs(path_text) or ".." in Path(path_text).parts or "\0" in path_text:
            raise self._refuse_outside(uri)
        real = os.path.realpath(path_text)
        root = next((r.uri for r in self.roots if not r.is_s3 and _within(real, r.uri)), None)
        if root is None:
            raise self._refuse_outside(uri)
        if not os.path.isdir(real):
            raise AdapterRefused(400, f"adapter uri {uri!r}: no adapter directory there")
        listing: list[tuple[str, str, int]] = []  # (relative path, real path, size)
        for dirpath, dirs, names in os.walk(real):
            dirs.sort()
            for name in sorted(names):
                file_real = os.path.realpath(os.path.join(dirpath, name))
                rel = Path(os.path.join(dirpath, name)).relative_to(real).as_posix()
                if not _within(file_real, root):
                    raise AdapterRefused(403, f"adapter uri {uri!r}: file {rel!r} resolves outside the artifact root; refused")
                if os.path.isfile(file_real):
                    listing.append((rel, file_real, os.stat(file_real).st_size))
        self._check_size(uri, [size for _, _, size in listing])

        files = self._copy(uri, [(rel, size, lambda p=src: _iter_file(p)) for rel, src, size in listing], dest)
        manifest_path = os.path.join(os.path.dirname(real), MANIFEST_NAME)
        manifest = None
        if os.path.dirname(real) != real and _within(os.path.dirname(real), root) and os.path.isfile(manifest_path):
            if not _within(os.path.realpath(manifest_path), root):
                raise AdapterRefused(403, f"adapter uri {uri!r}: its step manifest resolves outside the artifact root; refused")
            if os.stat(manifest_path).st_size > MAX_MANIFEST_BYTES:
                raise AdapterRefused(413, f"adapter uri {uri!r}: the step manifest beside it is over {MAX_MANIFEST_BYTES} bytes")
            manifest = manifest_path
            self._verify(uri, os.path.basename(real), files, Path(manifest_path).read_bytes(), manifest)
        return FetchedAdapter(dest, files, manifest)

    def _fetch_s3(self, uri: str, dest: Path) -> FetchedAdapter:
        from srpo_core.store import InvalidKeyError, KeyNotFoundError, S3Store, validate_key

        bucket, _, key = uri[len("s3://") :].partition("/")
        key = key.rstrip("/")
        try:
            validate_key(key, what="adapter key")
        except InvalidKeyError:
            raise self._refuse_outside(uri) from None
        full = f"s3://{bucket}/{key}"
        root = next((r.uri for r in self.roots if r.is_s3 and _within(full, r.uri) and full != r.uri), None)
        if root is None:
            raise self._refuse_outside(uri)
        store = S3Store.from_uri(f"s3://{bucket}")
        listing = self._list_s3(store, key, uri)
        if not listing:
            raise AdapterRefused(400, f"adapter uri {uri!r}: nothing stored under it")
        self._check_size(uri, [size for _, size in listing])
        files = self._copy(uri, [(k[len(key) + 1 :], size, lambda k=k: _iter_s3(store, k)) for k, size in listing], dest)
        manifest = None
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        if parent and _within(f"s3://{bucket}/{parent}", root):
            manifest_key = f"{parent}/{MANIFEST_NAME}"
            try:
                data = b"".join(_iter_s3(store, manifest_key, MAX_MANIFEST_BYTES))
            except KeyNotFoundError:
                data = None
            if data is not None:
                manifest = f"s3://{bucket}/{manifest_key}"
                self._verify(uri, key.rsplit("/", 1)[-1], files, data, manifest)
        return FetchedAdapter(dest, files, manifest)

    def _list_s3(self, store, key: str, uri: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `key/`, refusing past max_files without listing on."""
        from botocore.exceptions import BotoCoreError, ClientError

        out: list[tuple[str, int]] = []
        try:
            pages = store._client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=key + "/", PaginationConfig={"PageSize": 1000})
            for page in pages:
                out.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
                if len(out) > self.limits.max_files:
                    raise AdapterRefused(413, f"adapter uri {uri!r} holds more than {self.limits.max_files} files; refused (--max-adapter-files)")
        except (BotoCoreError, ClientError) as exc:
            raise store._translate(exc, key) from exc
        return sorted(out)

    def _check_size(self, uri: str, sizes: list[int]) -> None:
        if len(sizes) > self.limits.max_files:
            raise AdapterRefused(413, f"adapter uri {uri!r} holds {len(sizes)} files, above the server's cap of {self.limits.max_files} (--max-adapter-files)")
        if sum(sizes) > self.limits.max_bytes:
            raise AdapterRefused(413, f"adapter uri {uri!r} holds {sum(sizes)} bytes, above the server's cap of {self.limits.max_bytes} (--max-adapter-bytes); refused before download")

    def _copy(self, uri: str, sources, dest: Path) -> dict[str, tuple[str, int]]:
        """Write each (rel, listed size, chunk iterator) below dest, counting and hashing bytes."""
        from srpo_core.store import InvalidKeyError, validate_key

        dest.mkdir(parents=True, exist_ok=False)
        files: dict[str, tuple[str, int]] = {}
        total = 0
        for rel, listed, chunks in sources:
            try:
                validate_key(rel, what="adapter file")
            except InvalidKeyError as exc:
                raise AdapterRefused(400, f"adapter uri {uri!r}: {exc}") from None
            target = dest.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            with open(target, "xb") as fh:
                for chunk in chunks():
                    size += len(chunk)
                    total += len(chunk)
                    if size > listed or total > self.limits.max_bytes:
                        raise AdapterRefused(413, f"adapter uri {uri!r}: file {rel!r} grew past its listed size ({listed} bytes) while downloading; refused")
                    digest.update(chunk)
                    fh.write(chunk)
            files[rel] = (digest.hexdigest(), size)
        return files

    def _verify(self, uri: str, dir_name: str, files: dict[str, tuple[str, int]], manifest_bytes: bytes, where: str) -> None:
        from srpo_core.store import StepManifest

        try:
            manifest = StepManifest.from_json(manifest_bytes)
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterRefused(422, f"adapter uri {uri!r}: the step manifest {where} is unreadable ({exc}); refused") from None
        lead = dir_name + "/"
        expected = {rec.path[len(lead) :]: (rec.sha256, rec.size) for rec in manifest.files if rec.path.startswith(lead)}
        if not expected:
            raise AdapterRefused(422, f"adapter uri {uri!r}: the step manifest {where} lists no {lead} files; refused")
        problems = [f"missing: {p}" for p in sorted(expected.keys() - files.keys())]
        problems += [f"not in the manifest: {p}" for p in sorted(files.keys() - expected.keys())]
        problems += [
            f"corrupt: {p} (sha256 {files[p][0][:12]}, size {files[p][1]}; manifest {expected[p][0][:12]}, {expected[p][1]})" for p in sorted(files.keys() & expected.keys()) if files[p] != expected[p]
        ]
        if problems:
            raise AdapterRefused(422, f"adapter uri {uri!r} does not match its step manifest {where}: " + "; ".join(problems))


def _iter_file(path: str):
    with open(path, "rb") as fh:
        yield from iter(lambda: fh.read(_CHUNK), b"")


def _iter_s3(store, key: str, cap: int | None = None):
    """Stream one object (translated store errors); `cap` bounds what is read of it."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = store._client.get_object(Bucket=store.bucket, Key=key)["Body"]
        read = 0
        for chunk in body.iter_chunks(_CHUNK):
            read += len(chunk)
            if cap is not None and read > cap:
                raise AdapterRefused(413, f"s3://{store.bucket}/{key} is over {cap} bytes; refused")
            yield chunk
    except (BotoCoreError, ClientError) as exc:
        raise store._translate(exc, key) from exc

