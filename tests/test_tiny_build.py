"""The embedded tiny model: reproducible builds, HF loading, the shipped checkpoint and its cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from srpo_core import templates
from srpo_core.tasks import synthetic
from srpo_core.tiny import build as tb


def _sha256(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cfg = tb.TinyModelConfig().smoke()
    a = tb.build_tiny(cfg, root / "a", progress=False)
    b = tb.build_tiny(cfg, root / "b", progress=False)
    other = tb.build_tiny(dataclasses.replace(cfg, seed=1), root / "other", progress=False)
    return cfg, a, b, other


def test_smoke_build_is_bit_reproducible_and_seed_dependent(smoke):
    cfg, a, b, other = smoke
    assert _sha256(a) == _sha256(b)
    assert _sha256(a) != _sha256(other)
    info = json.loads((a / "build_info.json").read_text())
    assert info["config_hash"] == tb.config_hash(cfg) != tb.config_hash(dataclasses.replace(cfg, seed=1))
    assert info["seed"] == cfg.seed and info["steps_trained"] == cfg.max_steps + cfg.loc_steps
    for key in ("pass_at_1", "localization", "build_seconds", "torch_version", "transformers_version"):
        assert key in info


def test_saved_dir_loads_as_a_hugging_face_model(smoke):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, a, _, _ = smoke
    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert model.generation_config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<pad>")

    problem = synthetic.make_split("test", 1)[0]
    thoughts = synthetic.solution_thoughts(problem)
    for text in (
        templates.rollout_prompt("tiny_rollout_v1", problem.question) + "".join(thoughts),
        templates.localization_prompt("tiny_localization_v1", problem.question, thoughts) + "\\boxed{3}",
    ):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    for single in ("</thought>", "\\boxed{", "Step"):
        assert len(tok(single, add_special_tokens=False)["input_ids"]) == 1
    with torch.no_grad():
        out = model(**tok([text], return_tensors="pt", add_special_tokens=False))
    assert out.logits.shape[-1] == len(tok)


def test_shipped_checkpoint_matches_default_config_and_resolves():
    info_path = tb.SHIPPED_DIR / "build_info.json"
    assert info_path.exists(), "no shipped checkpoint: run `srpo build-tiny`"
    info = json.loads(info_path.read_text())
    # checked first, so that a stale checkpoint fails here instead of starting a full build
    assert info["config_hash"] == tb.config_hash(tb.TinyModelConfig()), "stale shipped checkpoint: run `srpo build-tiny`"
    assert Path(tb.resolve_model_path("builtin:tiny-arith")) == tb.SHIPPED_DIR
    assert 0.15 <= info["pass_at_1"] <= 0.60
    assert (tb.SHIPPED_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    assert tb.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert tb.resolve_model_path("/some/local/dir") == "/some/local/dir"
    with pytest.raises(ValueError):
        tb.resolve_model_path("builtin:no-such-model")


def test_shipped_model_greedy_pass_at_1_is_the_recorded_one(one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srpo_core.tiny import sft

    info = json.loads((tb.SHIPPED_DIR / "build_info.json").read_text())
    assert info["pass_at_1_split"] == "test[:200]"
    model = AutoModelForCausalLM.from_pretrained(tb.SHIPPED_DIR)
    tok = AutoTokenizer.from_pretrained(tb.SHIPPED_DIR)
    enc = sft.Encoder(tok, "tiny_rollout_v1", "tiny_localization_v1")
    problems = synthetic.make_split("test", 200)
    ev = sft.eval_rollouts(model, enc, problems, max_ops=8)
    assert ev.pass_at_1 == pytest.approx(info["pass_at_1"], abs=0.011)  # greedy: at most one item may flip on float ties
    # it answers the localization prompt in the expected format
    wrong = sft.wrong_chains(problems, ev.responses, ev.rewards)
    loc = sft.eval_localization(model, enc, wrong[:20])
    assert loc.answered >= 0.9


def test_ensure_tiny_builds_once_into_the_cache(tmp_path, monkeypatch):
    cfg = tb.TinyModelConfig().smoke()
    monkeypatch.setenv("SRPO_CACHE_DIR", str(tmp_path))
    first = tb.ensure_tiny(cfg)
    assert first.parent.parent == tmp_path and first != tb.SHIPPED_DIR
    assert json.loads((first / "build_info.json").read_text())["config_hash"] == tb.config_hash(cfg)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tb, "build_tiny", no_rebuild)
    assert tb.ensure_tiny(cfg) == first
    assert tb.ensure_tiny(tb.TinyModelConfig()) == tb.SHIPPED_DIR


def test_cli_build_tiny_smoke(tmp_path):
    from srpo_core import cli

    out = tmp_path / "cli"
    assert cli.main(["build-tiny", "--smoke", "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "build_info.json").read_text())
    assert info["seed"] == 3 and (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


# ----------------------------------------------------------------------------- tiny-arith-long


def test_builtin_configs_keep_the_default_hash_and_validate():
    # the fields added for tiny-arith-long enter the hash only off their defaults: the shipped
    # tiny-arith keeps the hash it was built with
    assert tb.config_hash(tb.TinyModelConfig()) == "a03f8c7ec66f12ef4fe70686d198bb7ca4e39519ac371271a19dde9f3e7c59ca"
    assert tb.config_hash(tb.LONG_CONFIG) != tb.config_hash(dataclasses.replace(tb.LONG_CONFIG, noise=0.6))
    assert set(tb.BUILTINS) == {"tiny-arith", "tiny-arith-long"}
    assert all(cfg.name == name for name, cfg in tb.BUILTINS.items())
    assert tb.LONG_CONFIG.spec == synthetic.LONG_CHAINS
    for bad in ({"noise": 0.0}, {"confused_facts": 0}, {"error_prone_op": "", "error_prone_steps": (0, 0)}, {"noise": 1.0}, {"init_from": "tiny-arith-long"}, {"min_ops": 0}):
        with pytest.raises(ValueError):
            dataclasses.replace(tb.LONG_CONFIG, **bad)


def test_confused_facts_and_noisy_traces():
    import random

    from srpo_core.tiny import sft

    confused = tb.confusions(tb.LONG_CONFIG)
    assert len(confused) == tb.LONG_CONFIG.confused_facts and confused == tb.confusions(tb.LONG_CONFIG)  # seeded
    for (a, op, b), wrong in confused.items():
        assert op == "*" and a not in (0, 5) and wrong != synthetic.apply(op, a, b)
        assert wrong in {synthetic.apply(op, a, c) for c in synthetic.MUL}  # another operand's result
    problems = synthetic.make_split("train", 400, spec=synthetic.LONG_CHAINS)
    hit = [p for p in problems if sft.has_confused_step(p, confused)]
    assert 0 < len(hit) < len(problems)
    rng = random.Random(0)
    for p in problems:
        k = sft.first_confused_step(p, confused)
        always = sft.noisy_thoughts(p, confused, 0.999999, rng)
        assert synthetic.first_error(p, always) == k  # None: the clean chain
        assert synthetic.first_error(p, sft.noisy_thoughts(p, confused, 1e-9, rng)) is None
    # with noise q a confused step is written wrong a fraction q of the time: 2000 draws of a
    # Bernoulli(0.65) have standard error 0.011, so +-0.05 is ~4.7 sigma
    p, k = next((p, sft.first_confused_step(p, confused)) for p in hit)
    wrong = sum(synthetic.first_error(p, sft.noisy_thoughts(p, confused, 0.65, rng)) == k for _ in range(2000))
    assert abs(wrong / 2000 - 0.65) < 0.05


def test_long_smoke_build_starts_from_tiny_arith_and_records_its_confusions(tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = dataclasses.replace(tb.LONG_CONFIG.smoke(), max_steps=0, loc_steps=0)  # no update: the weights stay tiny-arith's
    out = tb.build_tiny(cfg, tmp_path / "long", progress=False)
    info = json.loads((out / "build_info.json").read_text())
    assert info["name"] == "tiny-arith-long" and info["init_from"] == "tiny-arith"
    assert info["config"]["min_ops"] == 10 and info["config"]["error_prone_op"] == "*"
    assert set(info["confusions"]) == {f"{a}{op}{b}" for a, op, b in tb.confusions(cfg)}
    assert 0 <= info["greedy_confused_steps"]["first_error_there"] <= 1
    ours, base = load_file(out / "model.safetensors"), load_file(tb.SHIPPED_DIR / "model.safetensors")
    assert ours.keys() == base.keys() and all(torch.equal(ours[k], base[k]) for k in base)
    # and a few steps do train it, reproducibly
    cfg = tb.LONG_CONFIG.smoke()
    a, b = tb.build_tiny(cfg, tmp_path / "a", progress=False), tb.build_tiny(cfg, tmp_path / "b", progress=False)
    assert _sha256(a) == _sha256(b) != _sha256(tb.SHIPPED_DIR)


LONG_DIR = tb.shipped_dir("tiny-arith-long")


def test_shipped_long_checkpoint_matches_its_config_and_resolves():
    info_path = LONG_DIR / "build_info.json"
    assert info_path.exists(), "no shipped checkpoint: run `srpo build-tiny --name tiny-arith-long`"
    info = json.loads(info_path.read_text())
    assert info["config_hash"] == tb.config_hash(tb.LONG_CONFIG), "stale shipped checkpoint: run `srpo build-tiny --name tiny-arith-long`"
    assert info["init_from_config_hash"] == tb.config_hash(tb.TinyModelConfig())
    assert Path(tb.resolve_model_path("builtin:tiny-arith-long")) == LONG_DIR
    assert (LONG_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    # the fidelity regime: pass@1 in the window, first errors spread along the chain
    assert 0.30 <= info["pass_at_1"] <= 0.60
    hist = {k: v for k, v in info["greedy_first_error_histogram"].items() if k != "answer"}
    total = sum(hist.values())
    assert max(hist.values()) <= 0.5 * total and len(hist) >= 6
    loc = info["localization"]["greedy_wrong"]
    assert loc["exact"] > 2 * loc["chance_exact"] and loc["answered"] >= 0.9


def test_shipped_long_model_greedy_pass_at_1_is_the_recorded_one(one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srpo_core.tiny import sft

    info = json.loads((LONG_DIR / "build_info.json").read_text())
    n = tb.LONG_CONFIG.n_test
    assert info["pass_at_1_split"] == f"test[:{n}]"
    model = AutoModelForCausalLM.from_pretrained(LONG_DIR)
    tok = AutoTokenizer.from_pretrained(LONG_DIR)
    enc = sft.Encoder(tok, "tiny_rollout_v1", "tiny_localization_v1")
    problems = synthetic.make_split("test", n, spec=synthetic.LONG_CHAINS)
    ev = sft.eval_rollouts(model, enc, problems, max_ops=16)
    # greedy decoding: only float ties between the build's threads and ours can flip an item; allow one
    assert ev.pass_at_1 == pytest.approx(info["pass_at_1"], abs=1.01 / n)
    wrong = sft.wrong_chains(problems, ev.responses, ev.rewards)
    assert sft.error_histogram(wrong) == info["greedy_first_error_histogram"] or abs(len(wrong) - round((1 - info["pass_at_1"]) * n)) <= 1
    loc = sft.eval_localization(model, enc, wrong[:40])
    assert loc.answered >= 0.9
