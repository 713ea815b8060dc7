"""Local-backend tests of srpo_core.store: round trips, immutability, pointers, manifests."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from srpo_core import store as st


@pytest.fixture
def local(tmp_path: Path) -> st.LocalStore:
    s = st.open_store(tmp_path / "root")
    assert isinstance(s, st.LocalStore)
    return s


def make_adapter(path: Path, weights: bytes = b"\x00\x01" * 1000) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "extra").mkdir(exist_ok=True)
    (path / "extra" / "tokenizer.json").write_text("{}")
    return path


def test_open_store_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(st.ENV_ROOT, raising=False)
    assert st.open_store() == st.LocalStore(tmp_path.resolve() / "srpo_artifacts")
    monkeypatch.setenv(st.ENV_ROOT, str(tmp_path / "elsewhere"))
    assert st.open_store() == st.LocalStore(tmp_path.resolve() / "elsewhere")
    assert st.open_store(f"file://{tmp_path}/x") == st.LocalStore(tmp_path.resolve() / "x")
    s3 = st.open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, st.S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    with pytest.raises(ValueError, match="gs://"):
        st.open_store("gs://bucket")


def test_local_round_trip(local: st.LocalStore, tmp_path: Path) -> None:
    obj = local.put_bytes("a/b/c.bin", b"hello")
    assert obj == st.StoredObject("a/b/c.bin", st.sha256_bytes(b"hello"), 5)
    assert local.get_bytes("a/b/c.bin") == b"hello"
    assert local.exists("a/b/c.bin") and not local.exists("a/b/missing")

    src = tmp_path / "src.txt"
    src.write_text("file body")
    local.put_file("files/src.txt", src)
    assert local.get_file("files/src.txt", tmp_path / "out" / "copy.txt").read_text() == "file body"

    adapter = make_adapter(tmp_path / "adapter")
    uploaded = local.put_dir("ckpt/1", adapter)
    assert [o.key for o in uploaded] == [
        "ckpt/1/adapter_config.json",
        "ckpt/1/adapter_model.safetensors",
        "ckpt/1/extra/tokenizer.json",
    ]
    got = local.get_dir("ckpt/1", tmp_path / "down")
    assert len(got) == 3
    for rel in ("adapter_config.json", "adapter_model.safetensors", "extra/tokenizer.json"):
        assert (tmp_path / "down" / rel).read_bytes() == (adapter / rel).read_bytes()

    assert local.list("ckpt/") == [o.key for o in uploaded]
    assert local.list("a/") == ["a/b/c.bin"]
    assert local.list("ckpt/1/adapter_") == [o.key for o in uploaded[:2]]
    assert local.list("nothing/") == []
    assert not [p for p in local.root.rglob("*") if st._TMP_MARK in p.name], "temp files left behind"


def test_local_missing_keys_are_named(local: st.LocalStore, tmp_path: Path) -> None:
    with pytest.raises(st.KeyNotFoundError, match="no/such/key"):
        local.get_bytes("no/such/key")
    with pytest.raises(st.KeyNotFoundError, match="no/such/key"):
        local.get_file("no/such/key", tmp_path / "x")
    with pytest.raises(st.KeyNotFoundError, match="empty/prefix"):
        local.get_dir("empty/prefix", tmp_path / "x")
    with pytest.raises(st.KeyNotFoundError, match="latest"):
        local.get_pointer("latest")


@pytest.mark.parametrize("key", ["", "/abs", "trail/", "a//b", "a/../b", "./a", "a\\b", ".srpo_x/a", "pointers/latest"])
def test_invalid_or_reserved_keys(local: st.LocalStore, key: str) -> None:
    with pytest.raises(st.InvalidKeyError):
        local.put_bytes(key, b"x")


def test_immutability(local: st.LocalStore, tmp_path: Path) -> None:
    local.put_bytes("k", b"one")
    assert local.put_bytes("k", b"one").sha256 == st.sha256_bytes(b"one")  # same content: no-op
    with pytest.raises(st.ImmutableKeyError, match="'k'"):
        local.put_bytes("k", b"two")
    assert local.get_bytes("k") == b"one"

    path = tmp_path / "f"
    path.write_bytes(b"one")
    local.put_file("k", path)  # same bytes via a file: no-op
    path.write_bytes(b"three")
    with pytest.raises(st.ImmutableKeyError, match="'k'"):
        local.put_file("k", path)

    adapter = make_adapter(tmp_path / "adapter")
    local.put_dir("dir", adapter)
    local.put_dir("dir", adapter)  # a retried upload is idempotent
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    with pytest.raises(st.ImmutableKeyError, match="dir/adapter_config.json"):
        local.put_dir("dir", adapter)


def test_local_pointer_versions(local: st.LocalStore) -> None:
    assert local.get_pointer_versions("latest") == ()
    v1 = local.set_pointer("runs/x/latest", "one")
    v2 = local.set_pointer("runs/x/latest", "two")
    assert local.get_pointer("runs/x/latest") == "two"
    versions = local.get_pointer_versions("runs/x/latest")
    assert [v.version_id for v in versions] == [v2, v1]
    assert versions[0].is_latest and not versions[1].is_latest
    assert local.get_pointer("runs/x/latest", version_id=v1) == "one"
    assert local.list("pointers/") == ["pointers/runs/x/latest"]
    with pytest.raises(st.KeyNotFoundError, match="nope"):
        local.get_pointer("runs/x/latest", version_id="nope")


def test_save_load_verify_step(local: st.LocalStore, tmp_path: Path) -> None:
    config = {"lr": 1e-5, "model": {"name": "tiny"}}
    adapter = make_adapter(tmp_path / "adapter")
    manifest = st.save_step(local, "run-1", 10, adapter, config=config, data_cursor={"epoch": 0, "index": 640})
    assert local.exists("runs/run-1/steps/000010/manifest.json")
    assert manifest.config_hash == st.config_hash({"model": {"name": "tiny"}, "lr": 1e-5})
    assert manifest.code_version.package_version
    assert {f.path for f in manifest.files} == {"adapter_config.json", "adapter_model.safetensors", "extra/tokenizer.json"}

    # a retry (new created_at) is a no-op returning the stored manifest
    again = st.save_step(local, "run-1", 10, adapter, config=config, data_cursor={"epoch": 0, "index": 640})
    assert again == st.read_manifest(local, "run-1", 10) == manifest
    with pytest.raises(st.ImmutableKeyError, match="manifest"):
        st.save_step(local, "run-1", 10, adapter, config=config, data_cursor={"epoch": 1})

    assert st.get_latest_step(local, "run-1") is None
    with pytest.raises(st.KeyNotFoundError, match="000011"):
        st.set_latest_step(local, "run-1", 11)  # no manifest: refused
    st.set_latest_step(local, "run-1", 10)
    assert st.get_latest_step(local, "run-1") == 10

    child = st.save_step(local, "run-1", 20, make_adapter(tmp_path / "a2", b"new"), config=config,
                         parent_key=manifest.step_key)
    assert child.parent_key == "runs/run-1/steps/000010"

    dest = tmp_path / "restore"
    loaded = st.load_step(local, "run-1", 10, dest)
    assert loaded == manifest
    assert st.verify_step(local, "run-1", 10, dest) == manifest


def test_verify_names_corrupt_and_missing_files(local: st.LocalStore, tmp_path: Path) -> None:
    st.save_step(local, "run-2", 3, make_adapter(tmp_path / "adapter"), config={})
    dest = tmp_path / "restore"
    local.get_dir(st.step_prefix("run-2", 3), dest)

    (dest / "adapter_model.safetensors").write_bytes(b"bit rot")
    with pytest.raises(st.CheckpointIntegrityError, match="corrupt: adapter_model.safetensors") as err:
        st.verify_step(local, "run-2", 3, dest)
    assert err.value.corrupt == ("adapter_model.safetensors",) and err.value.missing == ()

    (dest / "extra" / "tokenizer.json").unlink()
    with pytest.raises(st.CheckpointIntegrityError, match="missing: extra/tokenizer.json") as err:
        st.verify_step(local, "run-2", 3, dest)
    assert err.value.missing == ("extra/tokenizer.json",)
    assert "corrupt: adapter_model.safetensors" in str(err.value)

    # a file missing from the store itself is reported by load_step, never skipped
    (local.root / "runs/run-2/steps/000003/adapter_config.json").unlink()
    with pytest.raises(st.CheckpointIntegrityError, match="missing: adapter_config.json"):
        st.load_step(local, "run-2", 3, tmp_path / "fresh")


def test_missing_manifest_is_named(local: st.LocalStore, tmp_path: Path) -> None:
    with pytest.raises(st.KeyNotFoundError, match="runs/run-3/steps/000007/manifest.json"):
        st.verify_step(local, "run-3", 7, tmp_path)


def test_step_keys() -> None:
    assert st.step_prefix("abc", 7) == "runs/abc/steps/000007"
    assert st.parse_step_key("runs/abc/steps/000007") == ("abc", 7)
    assert st.latest_pointer_name("abc") == "runs/abc/latest"
    with pytest.raises(st.InvalidKeyError):
        st.step_prefix("bad/id", 1)


def test_stores_pickle(local: st.LocalStore) -> None:
    assert pickle.loads(pickle.dumps(local)) == local
    s3 = st.S3Store.from_uri("s3://bucket/p", endpoint_url="http://127.0.0.1:1")
    _ = s3._client  # a cached boto3 client must not break pickling (Metaflow artifacts)
    assert pickle.loads(pickle.dumps(s3)) == s3


def test_a_step_attempt_that_died_before_its_manifest_does_not_block_the_rerun(local: st.LocalStore, tmp_path: Path) -> None:
    store = local
    prefix = st.step_prefix("run-1", 3)
    store.put_bytes(f"{prefix}/adapter_config.json", b'{"r": 4}')  # an attempt died mid-upload
    store.put_bytes(f"{prefix}/stale.bin", b"x")  # ... with a file the rerun does not write
    lease = st.acquire_lease(store, "run-1", st.LeaseHolder.current())  # the rerun holds the training's lease
    manifest = st.save_step(store, "run-1", 3, make_adapter(tmp_path / "adapter", b"\x00\x01" * 1000), config={"lr": 1}, lease=lease)
    assert store.list(prefix + "/") == sorted([f"{prefix}/{f.path}" for f in manifest.files] + [st.manifest_key("run-1", 3)])
    assert st.load_step(store, "run-1", 3, tmp_path / "restore") == manifest
    with pytest.raises(st.ImmutableKeyError):  # committed: the step's keys are immutable again
        st.save_step(store, "run-1", 3, make_adapter(tmp_path / "other", b"other"), config={"lr": 1})


# ---- one writer per training: leases, fencing, a `latest` that only moves forward -------------
# Each check takes a store, so tests/test_store_s3.py runs the same ones on S3 (moto).


def _holder(pid: int | None = None, run: str = "") -> st.LeaseHolder:
    import os

    return st.LeaseHolder.current(pid=os.getpid() if pid is None else pid, metaflow_run=run)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def check_second_writer_is_refused_naming_the_holder(store: st.Store) -> None:
    first = st.acquire_lease(store, "tid", _holder(run="SRPOFlow/17"))
    with pytest.raises(st.LeaseHeldError) as err:
        st.acquire_lease(store, "tid", _holder(run="SRPOFlow/18"))
    msg = str(err.value)
    h = first.holder
    for part in (h.host, f"pid {h.pid}", h.started_at, "SRPOFlow/17", st.TAKEOVER_ENV):
        assert part in msg, (part, msg)
    assert first.check(store).holder == h  # the holder keeps it
    renewed = first.renew(store)
    assert renewed.generation == first.generation + 1 and renewed.check(store).holder == h
    first_env = st.Lease.from_env(renewed.to_env())
    assert first_env == renewed


def check_dead_expired_or_overridden_holders_are_taken_over(store: st.Store) -> None:
    dead = st.acquire_lease(store, "t-dead", _holder(pid=_dead_pid()))  # same host, pid gone: kill -9
    new = st.acquire_lease(store, "t-dead", _holder())
    assert new.generation == dead.generation + 1
    with pytest.raises(st.LeaseLostError, match="no longer holds"):
        dead.check(store)
    with pytest.raises(st.LeaseLostError):
        dead.renew(store)
    expired = st.acquire_lease(store, "t-exp", _holder(), ttl_s=-1.0)  # alive, but its lease expired
    assert st.acquire_lease(store, "t-exp", _holder()).generation == 1
    with pytest.raises(st.LeaseLostError):
        expired.check(store)
    st.acquire_lease(store, "t-over", _holder())
    with pytest.raises(st.LeaseHeldError):
        st.acquire_lease(store, "t-over", _holder(), takeover=False)
    assert st.acquire_lease(store, "t-over", _holder(), takeover=True).generation == 1  # explicit override
    done = st.acquire_lease(store, "t-rel", _holder())
    done.release(store)
    with pytest.raises(st.LeaseLostError):
        done.check(store)
    assert st.acquire_lease(store, "t-rel", _holder()).generation == 2


def check_two_writers_racing_for_one_generation_get_one_winner(store: st.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from srpo_core.store import lease as lease_mod

    st.acquire_lease(store, "t-race", _holder()).release(store)  # generation 1: released, free for all
    free = lease_mod.current_lease(store, "t-race")
    c = st.acquire_lease(store, "t-race", _holder(run="SRPOFlow/C"))  # C creates generation 2 ...
    real, calls = lease_mod.current_lease, []

    def stale_first(s, tid):  # ... after B had read generation 1
        calls.append(tid)
        return free if len(calls) == 1 else real(s, tid)

    monkeypatch.setattr(lease_mod, "current_lease", stale_first)
    with pytest.raises(st.LeaseHeldError, match="SRPOFlow/C"):  # B's create of generation 2 fails; it re-reads: refused
        lease_mod.acquire_lease(store, "t-race", _holder(run="SRPOFlow/B"))
    monkeypatch.setattr(lease_mod, "current_lease", real)
    assert len(calls) == 2 and c.check(store).generation == 2
    assert len(store.list(lease_mod.lease_prefix("t-race"))) == 3


def check_latest_only_moves_forward(store: st.Store, tmp_path: Path) -> None:
    for step in (1, 2):
        st.save_step(store, "t-fwd", step, make_adapter(tmp_path / f"a{step}", bytes([step]) * 100), config={})
    st.set_latest_step(store, "t-fwd", 2)
    with pytest.raises(st.LatestRegressionError, match="backwards, from step 2 to step 1"):
        st.set_latest_step(store, "t-fwd", 1)
    assert st.get_latest_step(store, "t-fwd") == 2
    st.set_latest_step(store, "t-fwd", 2)  # the same step again: an idempotent move


def check_save_step_discards_uncommitted_keys_only_under_the_lease(store: st.Store, tmp_path: Path) -> None:
    prefix = st.step_prefix("t-disc", 0)
    store.put_bytes(f"{prefix}/adapter_config.json", b'{"r": 2}')  # another writer's upload in flight
    with pytest.raises(st.StoreError, match="only the holder of the training's lease"):
        st.save_step(store, "t-disc", 0, make_adapter(tmp_path / "a"), config={})
    assert store.get_bytes(f"{prefix}/adapter_config.json") == b'{"r": 2}'  # left alone
    other = st.acquire_lease(store, "t-disc", _holder())
    mine = st.acquire_lease(store, "t-disc", _holder(), takeover=True)
    with pytest.raises(st.LeaseLostError):  # a writer whose lease was taken over discards nothing
        st.save_step(store, "t-disc", 0, make_adapter(tmp_path / "a"), config={}, lease=other)
    assert store.get_bytes(f"{prefix}/adapter_config.json") == b'{"r": 2}'
    manifest = st.save_step(store, "t-disc", 0, make_adapter(tmp_path / "a"), config={}, lease=mine)
    assert st.load_step(store, "t-disc", 0, tmp_path / "restore") == manifest
    with pytest.raises(st.LeaseLostError):  # nor moves latest
        st.set_latest_step(store, "t-disc", 0, lease=other)
    st.set_latest_step(store, "t-disc", 0, lease=mine)


class _Interleaved:
    """A store whose put_dir runs `after_upload` once, right after writer A's files are stored:
    the moment the issue's replayed interleaving let writer B in."""

    def __init__(self, store: st.Store, after_upload):
        self._store, self._after = store, after_upload

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put_dir(self, prefix, local_dir):
        out = self._store.put_dir(prefix, local_dir)
        after, self._after = self._after, None
        if after:
            after()
        return out


def check_replayed_interleaving_of_two_writers_on_one_step(store: st.Store, tmp_path: Path) -> None:
    """Issue 16 finding 7, replayed: A uploads step 5; B (a second writer) discards A's uploads
    and uploads its own; A writes its manifest. Before the fix A's manifest described B's files
    (an integrity error forever: keys are immutable). Now B is refused (no lease) or, when B took
    the lease over, A finds its files replaced and writes no manifest; what gets committed
    verifies either way."""
    a_dir, b_dir = make_adapter(tmp_path / "A", b"A" * 300), make_adapter(tmp_path / "B", b"B" * 300)
    a = st.acquire_lease(store, "t-two", _holder(run="SRPOFlow/1"))
    errors = []

    def writer_b_without_lease():
        try:
            st.save_step(store, "t-two", 5, b_dir, config={})
        except st.StoreError as exc:
            errors.append(exc)

    st.save_step(_Interleaved(store, writer_b_without_lease), "t-two", 5, a_dir, config={}, lease=a)
    assert len(errors) == 1 and "lease" in str(errors[0])
    st.load_step(store, "t-two", 5, tmp_path / "rA")
    assert (tmp_path / "rA" / "adapter_model.safetensors").read_bytes() == b"A" * 300

    b_holder = _holder(run="SRPOFlow/2")

    def writer_b_taking_over():  # A looked dead to B (e.g. an expired lease): B takes over and uploads
        b = st.acquire_lease(store, "t-two", b_holder, takeover=True)
        prefix = st.step_prefix("t-two", 6)
        for key in store.list(prefix + "/"):
            store.discard(key)
        store.put_dir(prefix, b_dir)
        errors.append(b)

    with pytest.raises((st.CheckpointIntegrityError, st.LeaseLostError)):
        st.save_step(_Interleaved(store, writer_b_taking_over), "t-two", 6, a_dir, config={}, lease=a)
    assert not store.exists(st.manifest_key("t-two", 6))  # A wrote no manifest over B's files
    b = errors[-1]
    st.save_step(store, "t-two", 6, b_dir, config={}, lease=b)
    st.load_step(store, "t-two", 6, tmp_path / "rB")
    assert (tmp_path / "rB" / "adapter_model.safetensors").read_bytes() == b"B" * 300


def check_resume_point_adopts_under_the_lease(store: st.Store, tmp_path: Path) -> None:
    lease = st.acquire_lease(store, "t-res", _holder())
    st.save_step(store, "t-res", 0, make_adapter(tmp_path / "a"), config={}, lease=lease)  # died before latest
    assert st.resume_point(store, "t-res", lease=lease) == 0 and st.get_latest_step(store, "t-res") == 0


LEASE_CHECKS = [
    check_second_writer_is_refused_naming_the_holder,
    check_dead_expired_or_overridden_holders_are_taken_over,
    check_two_writers_racing_for_one_generation_get_one_winner,
    check_latest_only_moves_forward,
    check_save_step_discards_uncommitted_keys_only_under_the_lease,
    check_replayed_interleaving_of_two_writers_on_one_step,
    check_resume_point_adopts_under_the_lease,
]


def run_check(check, store: st.Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    params = inspect.signature(check).parameters
    kwargs = {"tmp_path": tmp_path, "monkeypatch": monkeypatch}
    check(store, **{k: v for k, v in kwargs.items() if k in params})


@pytest.mark.parametrize("check", LEASE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_lease_local(check, local: st.LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(st.TAKEOVER_ENV, raising=False)
    run_check(check, local, tmp_path, monkeypatch)
