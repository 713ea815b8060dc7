"""The local-directory backend: atomic writes (temp file + rename), pointer history in
`.srpo_pointer_versions/`."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from srpo_core.store.base import (
    _LOCAL_VERSIONS_DIR,
    _TMP_MARK,
    KeyNotFoundError,
    PointerVersion,
    Store,
    StoredObject,
    StoreUnreachableError,
    _atomic_write_local,
    _iter_file,
    _validate_prefix,
    fault_point,
    sha256_file,
    validate_key,
)

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
    def _put_bytes(self, key: str, data: bytes, sha: str) -> StoredObject:
        return self._put(key, sha, len(data), lambda: iter([data]))

    def _put_file(self, key: str, path: Path, sha: str, size: int) -> StoredObject:
        return self._put(key, sha, size, lambda: _iter_file(path))

    def _put(self, key: str, sha: str, size: int, chunks) -> StoredObject:
        dest = self._path(key)
        if dest.exists():
            self._check_same(key, sha)
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
            self._check_same(key, sha)
        except OSError:  # filesystem without hard links: check, then atomic replace
            if dest.exists():
                self._check_same(key, sha)
            else:
                os.replace(tmp, dest)

    def _stored_sha(self, key: str) -> str:
        if not self._path(key).is_file():
            raise KeyNotFoundError(f"key not found: {self.describe(key)}")
        return sha256_file(self._path(key))[0]

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
        fault_point("pointer", f"{name}={value}")
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


