"""S3-backend tests of srpo_core.store against a real moto_server (see tests/conftest_servers.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from srpo_core import store as st
from tests.conftest_servers import free_port
from tests.test_store import LEASE_CHECKS, run_check

pytestmark = pytest.mark.slow


@pytest.fixture
def s3(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> st.S3Store:
    monkeypatch.setenv(st.ENV_S3_ENDPOINT, s3_server)
    store = st.open_store(f"s3://{s3_bucket}/team/srpo")
    assert isinstance(store, st.S3Store) and store.endpoint_url == s3_server
    store.check_reachable()
    return store


def make_adapter(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_s3_round_trip_and_immutability(s3: st.S3Store, tmp_path: Path) -> None:
    s3.put_bytes("a/b.txt", b"hello")
    assert s3.get_bytes("a/b.txt") == b"hello"
    assert s3.exists("a/b.txt") and not s3.exists("a/c.txt")
    s3.put_bytes("a/b.txt", b"hello")  # same content: no-op
    with pytest.raises(st.ImmutableKeyError, match="a/b.txt"):
        s3.put_bytes("a/b.txt", b"other")
    assert s3.get_bytes("a/b.txt") == b"hello"
    assert s3.list("a/") == ["a/b.txt"]
    with pytest.raises(st.KeyNotFoundError, match=f"s3://{s3.bucket}/team/srpo/a/missing"):
        s3.get_bytes("a/missing")
    with pytest.raises(st.KeyNotFoundError, match="a/missing"):
        s3.get_file("a/missing", tmp_path / "x")


def test_s3_multipart_upload_is_conditional(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = st.S3Store(s3_bucket, endpoint_url=s3_server, multipart_threshold=6 << 20, part_size=5 << 20)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (11 << 12))  # 11 MiB -> 3 parts
    obj = store.put_file("big.bin", big)
    assert obj.size == big.stat().st_size
    store.put_file("big.bin", big)  # same content: no-op
    assert store.get_file("big.bin", tmp_path / "down.bin").read_bytes() == big.read_bytes()
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x01" * (7 << 20))
    with pytest.raises(st.ImmutableKeyError, match="big.bin"):
        store.put_file("big.bin", other)


def test_s3_checkpoints_and_versioned_latest(s3: st.S3Store, tmp_path: Path) -> None:
    config = {"algo": "srpo", "lr": 2e-5}
    m1 = st.save_step(s3, "run-s3", 1, make_adapter(tmp_path / "c1", b"weights-1" * 500), config=config,
                      data_cursor={"index": 64})
    v1 = st.set_latest_step(s3, "run-s3", 1)
    m2 = st.save_step(s3, "run-s3", 2, make_adapter(tmp_path / "c2", b"weights-2" * 700), config=config,
                      parent_key=m1.step_key, data_cursor={"index": 128})
    v2 = st.set_latest_step(s3, "run-s3", 2)
    assert v1 and v2 and v1 != v2

    assert st.get_latest_step(s3, "run-s3") == 2
    versions = s3.get_pointer_versions(st.latest_pointer_name("run-s3"))
    assert [v.version_id for v in versions] == [v2, v1]
    assert versions[0].is_latest
    assert st.get_latest_step(s3, "run-s3", version_id=v1) == 1
    assert s3.get_pointer(st.latest_pointer_name("run-s3"), version_id=v2) == "runs/run-s3/steps/000002"

    for manifest, weights in ((m1, b"weights-1" * 500), (m2, b"weights-2" * 700)):
        dest = tmp_path / f"restore-{manifest.step}"
        assert st.load_step(s3, "run-s3", manifest.step, dest) == manifest
        assert (dest / "adapter_model.safetensors").read_bytes() == weights
    assert st.read_manifest(s3, "run-s3", 2).parent_key == "runs/run-s3/steps/000001"
    assert st.read_manifest(s3, "run-s3", 2).data_cursor == {"index": 128}

    keys = s3.list("runs/run-s3/steps/000002/")
    assert keys == [f"runs/run-s3/steps/000002/{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "manifest.json")]

    dest = tmp_path / "restore-1"
    (dest / "adapter_config.json").write_text("tampered")
    with pytest.raises(st.CheckpointIntegrityError, match="corrupt: adapter_config.json"):
        st.verify_step(s3, "run-s3", 1, dest)


def test_s3_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv(st.ENV_S3_ENDPOINT, endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = st.open_store("s3://some-bucket/prefix")
    start = time.monotonic()
    with pytest.raises(st.StoreUnreachableError) as err:
        store.check_reachable()
    assert time.monotonic() - start < 5
    assert endpoint in str(err.value) and "some-bucket" in str(err.value)


def test_s3_missing_bucket_is_named(s3_server: str) -> None:
    store = st.S3Store("no-such-bucket-here", endpoint_url=s3_server)
    with pytest.raises(st.StoreUnreachableError, match="'no-such-bucket-here'.*does not exist"):
        store.check_reachable()
    with pytest.raises(st.StoreUnreachableError, match="no-such-bucket-here"):
        store.put_bytes("x", b"y")


def test_s3_a_step_attempt_that_died_before_its_manifest_does_not_block_the_rerun(s3: st.S3Store, tmp_path: Path) -> None:
    store = s3
    prefix = st.step_prefix("run-1", 3)
    store.put_bytes(f"{prefix}/adapter_config.json", b'{"r": 4}')  # an attempt died mid-upload
    store.put_bytes(f"{prefix}/stale.bin", b"x")  # ... with a file the rerun does not write
    lease = st.acquire_lease(store, "run-1", st.LeaseHolder.current())  # the rerun holds the training's lease
    manifest = st.save_step(store, "run-1", 3, make_adapter(tmp_path / "adapter", b"\x00\x01" * 1000), config={"lr": 1}, lease=lease)
    assert store.list(prefix + "/") == sorted([f"{prefix}/{f.path}" for f in manifest.files] + [st.manifest_key("run-1", 3)])
    assert st.load_step(store, "run-1", 3, tmp_path / "restore") == manifest
    with pytest.raises(st.ImmutableKeyError):  # committed: the step's keys are immutable again
        st.save_step(store, "run-1", 3, make_adapter(tmp_path / "other", b"other"), config={"lr": 1})


@pytest.mark.parametrize("check", LEASE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_lease_s3(check, s3: st.S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(st.TAKEOVER_ENV, raising=False)
    run_check(check, s3, tmp_path, monkeypatch)
