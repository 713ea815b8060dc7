"""Config: presets, the paper's defaults, overrides, and errors that name file, line and key."""

import dataclasses

import pytest

from srpo_core.config import Config, ConfigError, load_config


def test_paper_preset_has_table5_values():
    cfg = load_config("paper")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-14B-Instruct"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 64, 0.0)
    assert cfg.optim.lr == 5e-5 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0
    assert (cfg.train.prompts_per_step, cfg.train.mini_batch_prompts, cfg.train.update_epochs, cfg.train.epochs) == (32, 8, 1, 2)
    assert cfg.data.train_size == 400
    r = cfg.rollout
    assert (r.max_thoughts, r.max_thought_tokens, r.max_response_tokens, r.max_prompt_tokens) == (20, 256, 4096, 2048)
    assert (r.temperature, r.top_p, r.top_k) == (0.7, 0.95, 0)
    m = cfg.method
    assert (m.method, m.split, m.resolved_localizer, m.rollouts_per_prompt, m.seed_search_budget) == ("srpo", "1x4", "self", 8, 12)
    assert m.resolved_localization_temperature == 0.3
    assert cfg.loss.loss == "pg" and cfg.loss.kl_coef == 0.0
    assert cfg.eval.temperature == 0.0 and cfg.eval.items_per_benchmark == 500
    assert cfg.resources["learner"]["gpu"] >= 1 and "gpu" not in load_config("tiny").resources.get("learner", {})


def test_olmo_preset():
    assert load_config("paper_olmo").model.name_or_path == "allenai/Olmo-3-7B-Instruct"


def test_dataclass_defaults_are_the_paper():
    assert Config().optim.lr == 5e-5 and Config().rollout.temperature == 0.7


def test_localization_temperature_per_split():
    assert load_config("tiny", {"method.split": "1x8"}).method.resolved_localization_temperature == 0.0
    assert load_config("tiny", {"method.split": "2x4"}).method.resolved_localization_temperature == 0.3


def test_override_method_resets_default_localizer():
    cfg = load_config("tiny")
    assert cfg.override(**{"method.method": "rrpo"}).method.resolved_localizer == "random"
    with pytest.raises(ConfigError, match="rrpo resets at random"):
        cfg.override(**{"method.method": "rrpo", "method.localizer": "oracle"})


def test_hash_changes_with_values():
    cfg = load_config("tiny")
    assert cfg.hash() == load_config("tiny").hash()
    assert cfg.hash() != cfg.override(**{"train.seed": 42}).hash()


@pytest.mark.parametrize("body,line,fragment", [
    ("rollout:\n  temprature: 0.5\n", 2, "rollout.temprature: unknown key (did you mean 'temperature'?)"),
    ("model:\n  name_or_path: x\nrollout:\n  top_p: 1.5\n", 4, "rollout.top_p: must be in (0, 1]"),
    ("method:\n  method: srpo\n  split: 3x4\n", 3, "method.split: one of"),
    ("optim:\n  lr: fast\n", 2, "optim.lr: expected a number, got 'fast'"),
    ("train:\n  prompts_per_step: 32\n  mini_batch_prompts: 5\n", 3, "must divide prompts_per_step"),
    ("optim:\n  betas: [0.9]\n", 2, "optim.betas: expected 2 items"),
    ("methd:\n  method: grpo\n", 1, "methd: unknown key (did you mean 'method'?)"),
])
def test_bad_config_names_file_line_and_key(tmp_path, body, line, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: ") and fragment in msg


def test_invalid_yaml_and_missing_preset(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such file and no preset"):
        load_config("nonexistent-preset")


def test_results_config_leaves_out_only_where_and_how_fast():
    """A checkpoint's config hash ignores scheduler requests, the server, learner processes and
    threads (a resume may change them) and nothing else."""
    from srpo_core.config import results_config
    from srpo_core.store import config_hash

    base = load_config("paper").to_dict()
    same = load_config("paper", {"train.processes": 2, "rollout.server_url": "http://x:1", "model.threads": 4}).to_dict()
    same["resources"]["learner"]["memory"] = 480000
    assert config_hash(results_config(same)) == config_hash(results_config(base))
    for key, value in (("optim.lr", 1e-4), ("train.micro_batch_tokens", 8192), ("method.split", "2x4")):
        other = load_config("paper", {key: value}).to_dict()
        assert config_hash(results_config(other)) != config_hash(results_config(base)), key
    assert "resources" in base and "processes" in base["train"]  # the input is not changed


def test_set_overrides_read_numbers_as_a_user_writes_them():
    """`--set optim.lr=1e-3` is a number (YAML 1.1 alone reads it as a string and the config
    refused it); other strings stay strings."""
    from srpo_core.config import load_config, parse_overrides

    assert parse_overrides(["optim.lr=1e-3", "train.seed=2", "model.name_or_path=x1e3", "optim.lr=1.5E+2"]) == {"optim.lr": 150.0, "train.seed": 2, "model.name_or_path": "x1e3"}
    assert load_config("tiny", parse_overrides(["optim.lr=1e-3"])).optim.lr == 1e-3


def test_extends_merges_sections_key_by_key_and_names_the_child(tmp_path):
    base = load_config("fidelity")
    child = tmp_path / "mine.yaml"
    child.write_text("extends: fidelity\noptim:\n  lr: 2.0e-4\neval:\n  every_steps: 3\n")
    cfg = load_config(str(child))
    assert cfg.name == "mine" and cfg.optim.lr == 2e-4 and cfg.eval.every_steps == 3
    # every other key of the touched sections, and every untouched section, is the base's
    assert cfg.optim.weight_decay == base.optim.weight_decay and cfg.eval.items_per_benchmark == base.eval.items_per_benchmark
    assert cfg.model == base.model and cfg.data == base.data and cfg.train == base.train


def test_the_main_jobs_demo_preset_is_the_fidelity_regime_with_grpo():
    demo, fidelity = load_config("demo"), load_config("fidelity")
    assert demo.method.method == "grpo" and demo.optim.lr == 1e-3 and demo.eval.every_steps == 6
    assert (demo.model, demo.data, demo.train) == (fidelity.model, fidelity.data, fidelity.train)
    assert demo.rollout == dataclasses.replace(fidelity.rollout, server_url="auto")  # one server and learner worker for the whole training
    assert demo.eval.items_per_benchmark >= 500  # the gain is read on at least 500 items


def test_extends_refuses_a_loop_naming_it(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\n")
    b.write_text(f"extends: {a}\n")
    with pytest.raises(ConfigError, match="loops back: a -> b -> a"):
        load_config(str(a))


def test_the_flows_config_parser_resolves_extends():
    from srpo_core.flow_config import parse_config

    d = parse_config("extends: fidelity\nmethod:\n  method: rrpo\n")
    assert d["method"]["method"] == "rrpo" and d["data"]["task"] == "synthetic_long" and d["resources"]["generation"]["cpu"] == 1
