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
    manifest = st.save_step(store, "run-1", 3, make_adapter(tmp_path / "adapter", b"\x00\x01" * 1000), config={"lr": 1})
    assert store.list(prefix + "/") == sorted([f"{prefix}/{f.path}" for f in manifest.files] + [st.manifest_key("run-1", 3)])
    assert st.load_step(store, "run-1", 3, tmp_path / "restore") == manifest
    with pytest.raises(st.ImmutableKeyError):  # committed: the step's keys are immutable again
        st.save_step(store, "run-1", 3, make_adapter(tmp_path / "other", b"other"), config={"lr": 1})
