"""The one step algorithm: a seeded epoch step run in memory (the plain loop's path: `srpo train`,
`srpo compare`) and through the store (the flow's phase functions) gives identical records;
methods come from the registry; `rollout.engine` is the engine that runs."""

import types

import pytest

from srpo_core import data_order, flow_phases, methods, step
from srpo_core.config import ConfigError, load_config
from srpo_core.records import records_jsonl
from srpo_core.shard import PhaseContext
from srpo_core.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_model_path, **over):
    return load_config("tiny", {"model.name_or_path": tiny_model_path, "train.prompts_per_step": 8, "train.mini_batch_prompts": 8, **over})


def _through_the_store(cfg, tmp_path, step_index=0) -> str:
    """Epoch step `step_index` as the flow's steps run it: every phase a separate call that reads
    its shard from the store and writes it back (one shard)."""
    ctx = flow_phases.StepContext(cfg.to_dict(), "t-identical", step_index, "run1", str(tmp_path / "artifacts"), None)
    (ids,) = flow_phases.plan_shards(ctx, 1)
    key = flow_phases.phase_generate(ctx, 0, ids)
    for phase in ("verify", "localize", "suffix", "verify_suffix"):
        key = flow_phases.run_stored_phase(ctx, phase, 0, key)
    result = step.finish(cfg, get_task(cfg.data.task), [flow_phases._get(ctx, key)])
    return records_jsonl(result.records, step_index, cfg)


def _in_memory(cfg, step_index=0) -> str:
    from srpo_core.loop import open_session

    session = open_session(cfg)
    result = step.run_rollout_phases(session.engine, session.task, cfg, data_order.step_items(cfg, step_index), step_index)
    return records_jsonl(result.records, step_index, cfg)


@pytest.mark.parametrize(
    "over",
    [{"method.method": "srpo", "method.localizer": "self"}, {"method.method": "grpo", "method.localizer": ""}, {"method.method": "rrpo", "method.localizer": "", "method.split": "2x4"}],
    ids=["srpo-self", "grpo", "rrpo-2x4"],
)
def test_a_seeded_step_gives_identical_records_in_memory_and_through_the_store(tiny_model_path, tmp_path, over):
    cfg = _cfg(tiny_model_path, **over)
    memory, stored = _in_memory(cfg, 1), _through_the_store(cfg, tmp_path, 1)
    assert memory.count("\n") >= 8 * 8  # every prompt's budget, seeds on top
    assert memory == stored


def test_another_seed_samples_other_records(tiny_model_path):
    """The comparison above can fail: the records depend on the seed scheme."""
    a = _in_memory(_cfg(tiny_model_path, **{"train.seed": 0}))
    b = _in_memory(_cfg(tiny_model_path, **{"train.seed": 1}))
    assert a != b


def test_a_phase_the_method_does_not_use_does_nothing(tiny_model_path, tmp_path, capsys):
    cfg = _cfg(tiny_model_path, **{"method.method": "grpo", "method.localizer": ""})
    ctx = flow_phases.StepContext(cfg.to_dict(), "t-skip", 0, "run1", str(tmp_path), None)
    assert flow_phases.run_stored_phase(ctx, "localize", 0, "some/key.json") == "some/key.json"  # never read, nothing loaded
    assert "method grpo has nothing to do in phase localize" in capsys.readouterr().out
    assert not step.needs_model(cfg, "suffix") and step.needs_model(_cfg(tiny_model_path), "suffix")


def test_config_choices_come_from_the_registry():
    from srpo_core import config

    assert config.METHODS == methods.names() and {"grpo", "rrpo", "srpo"} <= set(methods.names())
    assert set(config.LOSSES) == {loss for name in methods.names() for loss in methods.get(name).losses}
    from srpo_core.algos import LOSSES

    assert set(config.LOSSES) <= set(LOSSES)  # every loss a method allows is implemented
    with pytest.raises(ConfigError, match="method.method: one of"):
        load_config("tiny", {"method.method": "nope"})


def test_a_registered_method_is_a_config_choice_without_other_edits(monkeypatch):
    """Adding a method is its module and its registration: the config accepts it, validates its
    own options, and the step algorithm runs its phases."""
    from dataclasses import dataclass

    from srpo_core.methods.grpo import GRPO

    @dataclass(frozen=True)
    class Opts:
        width: int = 2

    class Wide(GRPO):
        name = "wide"
        options_class = Opts

    monkeypatch.setitem(methods.REGISTRY, "wide", Wide())
    from srpo_core import config

    monkeypatch.setattr(config, "METHODS", methods.names())
    cfg = load_config("tiny", {"method.method": "wide", "method.options": {"width": 3}})
    assert cfg.method.spec.name == "wide" and cfg.method.parsed_options == Opts(3)
    with pytest.raises(ConfigError, match="method.options.wdth: unknown key"):
        load_config("tiny", {"method.method": "wide", "method.options": {"wdth": 3}})


def test_unused_or_unsafe_settings_are_refused():
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        load_config("tiny", {"model.trust_remote_code": True})


# ---- rollout.engine reaches the engine ----------------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model):
    """vLLM's offline API, stood in by tests/test_vllm.py's FakeLLM over the tiny model; records
    which models were opened."""
    from tests.test_vllm import FAKE_API, FakeLLM

    opened = []

    def llm(model, **kwargs):
        opened.append((model, kwargs, FakeLLM(*tiny_model)))
        return opened[-1][2]

    api = types.SimpleNamespace(**{**vars(FAKE_API), "LLM": llm})
    monkeypatch.setattr("srpo_core.engine.vllm.vllm_api", lambda: api)
    return opened


def test_a_preset_saying_vllm_runs_the_vllm_engine(tiny_model_path, tmp_path, fake_vllm):
    from srpo_core.engine.vllm import VLLMEngine

    assert load_config("paper").rollout.engine == "vllm"
    cfg = _cfg(tiny_model_path, **{"rollout.engine": "vllm"})
    ctx = flow_phases.StepContext(cfg.to_dict(), "t-vllm", 0, "run1", str(tmp_path), None)
    engine = flow_phases.load_engine(ctx)
    assert isinstance(engine, VLLMEngine) and fake_vllm[-1][0] == tiny_model_path
    flow_phases.phase_generate(ctx, 0, flow_phases.plan_shards(ctx, 1)[0])  # the flow's generate samples through it
    assert len(fake_vllm) == 2 and fake_vllm[-1][2].calls
    from srpo_core.loop import open_session

    session = open_session(cfg)  # the plain loop too
    assert isinstance(session.engine, VLLMEngine)
    ctx2 = PhaseContext(cfg, get_task("synthetic"), 0, 0, session.engine)
    shard = step.start(ctx2, data_order.step_items(cfg, 0))
    step.run_phase("generate", ctx2, shard)
    assert session.engine.llm.calls and all(shard.pending)
    session.sync_policy("step-1")  # after an update, vLLM samples from the saved adapter
    assert session.engine.lora_request is not None and session.engine.adapter_version == "step-1"
