"""One source of truth for configuration: frozen dataclasses validated in `__post_init__`,
filled from YAML. Defaults are the paper's (table 5, SPEC.md); presets live in presets/*.yaml.

`load_config("tiny")` loads a preset by name, `load_config("path/to.yaml")` a file. A bad file
fails with the file, the line, the dotted key and the reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from srpo_core import methods as _methods
from srpo_core.rollouts import LOCALIZERS as _LOCALIZERS
from srpo_core.rollouts import SPLITS as _SPLITS

# The names a config may choose, read from the registries (one list of names each).
METHODS = _methods.names()
SPLITS = tuple(_SPLITS)
LOCALIZERS = tuple(_LOCALIZERS)
LOSSES = tuple(dict.fromkeys(loss for name in METHODS for loss in _methods.get(name).losses))


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the file, line and key."""


def _require(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {reason}")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2.5-14B-Instruct"
    dtype: str = "bfloat16"
    max_model_len: int = 32768
    chat_template_for_localization: bool = True
    trust_remote_code: bool = False  # refused when true: srpo never runs code from a model repository
    threads: int = 0  # torch CPU threads per process (0: torch's default); 1 suits tiny models

    def __post_init__(self):
        _require(self.threads >= 0, "model.threads", "must be >= 0")
        _require(not self.trust_remote_code, "model.trust_remote_code", "is not supported: srpo never runs code shipped with a model (use a model transformers supports natively)")
        _require(bool(self.name_or_path), "model.name_or_path", "must be a Hugging Face id, a path or builtin:NAME")
        _require(self.dtype in ("float32", "bfloat16", "float16", "auto"), "model.dtype", "float32|bfloat16|float16|auto")
        _require(self.max_model_len > 0, "model.max_model_len", "must be > 0")


@dataclass(frozen=True)
class RolloutConfig:
    template: str = "rollout_v1"
    max_thoughts: int = 20
    max_thought_tokens: int = 256
    max_response_tokens: int = 4096
    max_prompt_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = no top-k
    stop: str = "</thought>"
    engine: str = "hf"  # "hf" | "vllm" (in process, or behind our server) | "openai" (a stock `vllm serve` at server_url, srpo_core/engine/openai_api.py)
    scheduler: str = "batched"  # in-memory steps: batched (phase by phase) | events (srpo_core/scheduler.py; engine hf or vllm) | auto (events on the HF engine, else batched)
    server_url: str = ""  # "": each phase step loads the model; "auto": the training starts one local inference server and one learner worker for all its epoch steps; else the URL of a running server
    lora_dir: str = ""  # engine openai: where phases stage step adapters for the vLLM server (an absolute path both mount; "": a local artifact store is read in place)
    score_unfinished: bool = False  # false (paper): a chain that ends without an answer (finish_reason != "answer") gets reward 0 in training and evaluation; true: its text is scored

    def __post_init__(self):
        for name in ("max_thoughts", "max_thought_tokens", "max_response_tokens", "max_prompt_tokens"):
            _require(getattr(self, name) > 0, f"rollout.{name}", "must be > 0")
        _require(self.max_thought_tokens <= self.max_response_tokens, "rollout.max_thought_tokens", "must be <= max_response_tokens")
        _require(self.temperature >= 0, "rollout.temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _require(self.top_k >= 0, "rollout.top_k", "must be >= 0")
        _require(bool(self.stop), "rollout.stop", "must be a non-empty stop string")
        _require(self.engine in ("hf", "vllm", "openai"), "rollout.engine", "hf|vllm|openai")
        _require(self.scheduler in ("auto", "batched", "events"), "rollout.scheduler", "auto|batched|events")
        _require(self.scheduler != "events" or self.engine in ("hf", "vllm"), "rollout.scheduler",
                 "events needs an engine that requests join while others decode: rollout.engine hf (its continuous batch) or vllm (its engine loop); use auto or batched")
        _require(self.server_url in ("", "auto") or self.server_url.startswith(("http://", "https://")), "rollout.server_url", "empty, 'auto' or an http(s):// URL")
        _require(
            self.engine != "openai" or self.server_url.startswith(("http://", "https://")), "rollout.server_url",
            f"rollout.engine openai talks to a running `vllm serve --enable-lora` through its OpenAI-compatible API: set rollout.server_url to its http(s):// URL "
            f"(e.g. http://vllm:8000), not {self.server_url!r} ('' and 'auto' start no vLLM server)",
        )  # fmt: skip
        _require(self.lora_dir == "" or self.lora_dir.startswith("/"), "rollout.lora_dir", f"must be an absolute path (the vLLM server reads adapters at the same path), got {self.lora_dir!r}")
        _require(self.lora_dir == "" or self.engine == "openai", "rollout.lora_dir", "is used only with rollout.engine openai (our server and in-process engines read the artifact store)")


@dataclass(frozen=True)
class MethodConfig:
    method: str = "srpo"
    split: str = "1x4"
    localizer: str = ""  # empty: the method's default (rrpo: random, srpo: self)
    rollouts_per_prompt: int = 8
    seed_search_budget: int = 12
    incorrect_threshold: float | None = None  # None: the task's seed rule (Task.is_incorrect: reward 0 for binary tasks, < 1 for code); a number: reward <= threshold is incorrect
    localization_template: str = "localization_v1"
    localization_temperature: float = -1.0  # < 0: 0.3 for 1x4 and 2x4, 0.0 for 1x8 (REFERENCE.md)
    localization_max_tokens: int = 4096
    options: dict = field(default_factory=dict)  # the method's own settings (its options_class in srpo_core/methods/)
    # localization audit judge (srpo_core/audit.py): "" = the step checker where the task has one, else
    # none; "none"; "checker"; a model path / hub id / builtin:NAME; an http(s):// srpo server URL
    audit_judge: str = ""
    audit_sample: int = 0  # seeds per shard and step sent to a model judge (0: all)
    audit_max_tokens: int = 1024  # the model judge's output tokens (REFERENCE "Localization audit")

    def __post_init__(self):
        _require(self.method in METHODS, "method.method", f"one of {METHODS}")
        _require(self.split in SPLITS, "method.split", f"one of {SPLITS}")
        _require(self.resolved_localizer in LOCALIZERS, "method.localizer", f"one of {LOCALIZERS}")
        _require(self.rollouts_per_prompt > 0, "method.rollouts_per_prompt", "must be > 0 (a method may ask more: grpo and the reset methods need > 1)")
        _require(self.seed_search_budget >= 1, "method.seed_search_budget", "must be >= 1")
        _require(self.localization_max_tokens > 0, "method.localization_max_tokens", "must be > 0")
        _require(self.incorrect_threshold is None or 0 <= self.incorrect_threshold < 1, "method.incorrect_threshold", "null (the task's rule) or a number in [0, 1)")
        _require(self.audit_sample >= 0, "method.audit_sample", "must be >= 0 (0: every seed)")
        _require(self.audit_max_tokens > 0, "method.audit_max_tokens", "must be > 0")
        _require(bool(self.audit_judge.strip()) or self.audit_judge == "", "method.audit_judge", "empty, 'none', 'checker', a model path or an http(s):// URL")
        for key, reason in self.spec.validate(self):
            _require(False, key, reason)
        self.parsed_options  # noqa: B018 - validates method.options against the method's options_class

    @property
    def spec(self) -> "_methods.Method":
        """The registered method this config names."""
        return _methods.get(self.method)

    @property
    def parsed_options(self):
        return _build(self.spec.options_class, self.options, "method.options")

    @property
    def resolved_localizer(self) -> str:
        return self.localizer or self.spec.default_localizer

    @property
    def resolved_localization_temperature(self) -> float:
        if self.localization_temperature >= 0:
            return self.localization_temperature
        return 0.0 if self.split == "1x8" else 0.3


@dataclass(frozen=True)
class LossConfig:
    loss: str = "pg"  # "pg" (paper: no ratio, no clip) | "clip" (table 4 ablation)
    clip_eps: float = 0.2
    dual_clip: float = 3.0
    kl_coef: float = 0.0

    def __post_init__(self):
        _require(self.loss in LOSSES, "loss.loss", f"one of {LOSSES}")
        _require(0 < self.clip_eps < 1, "loss.clip_eps", "must be in (0, 1)")
        _require(self.dual_clip > 1, "loss.dual_clip", "must be > 1")
        _require(self.kl_coef == 0.0, "loss.kl_coef", "KL regularisation is not implemented (the paper uses none)")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    target_modules: str = "all-linear"

    def __post_init__(self):
        _require(self.r > 0, "lora.r", "must be > 0")
        _require(self.alpha > 0, "lora.alpha", "must be > 0")
        _require(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear warmup over optimizer steps (algos.warmup_factor); 0: none (the paper)

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0 (0: no warmup)")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.grad_clip > 0, "optim.grad_clip", "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    prompts_per_step: int = 32
    mini_batch_prompts: int = 8
    micro_batch_sequences: int = 8
    update_epochs: int = 1
    epochs: int = 2
    max_steps: int = 0  # 0: epochs * train_size / prompts_per_step
    seed: int = 0
    gradient_checkpointing: bool = False
    micro_batch_tokens: int = 0  # > 0: a micro-batch also holds at most this many padded tokens
    processes: int = 1  # learner processes (FSDP2 under torchrun when > 1); 0: one per visible GPU
    share_prefix_forward: bool = True  # forward a context (prompt + reset prefix) shared by several sequences once; same loss and gradients

    def __post_init__(self):
        _require(self.prompts_per_step > 0, "train.prompts_per_step", "must be > 0")
        _require(0 < self.mini_batch_prompts <= self.prompts_per_step, "train.mini_batch_prompts", "must be in 1..prompts_per_step")
        _require(self.prompts_per_step % self.mini_batch_prompts == 0, "train.mini_batch_prompts", "must divide prompts_per_step")
        _require(self.micro_batch_sequences > 0, "train.micro_batch_sequences", "must be > 0")
        _require(self.micro_batch_tokens >= 0, "train.micro_batch_tokens", "must be >= 0 (0: no token limit)")
        _require(self.processes >= 0, "train.processes", "must be >= 0 (0: one per visible GPU)")
        _require(self.update_epochs > 0, "train.update_epochs", "must be > 0")
        _require(self.epochs > 0, "train.epochs", "must be > 0")
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    task: str = "numinamath_olympiads"  # "synthetic" or a benchmark name
    train_size: int = 400
    data_seed: int = 42
    path: str = ""  # a local JSONL file; empty: the task's default source
    # the synthetic task's chains (srpo_core.tasks.synthetic.ChainSpec): min_ops, max_ops,
    # op_weights [+, -, *], error_prone_op, error_prone_steps [min, max]; empty: the default chains
    synthetic: dict = field(default_factory=dict)

    def __post_init__(self):
        _require(bool(self.task), "data.task", "must name a task")
        _require(self.train_size > 0, "data.train_size", "must be > 0")
        if self.synthetic:
            from srpo_core.tasks.synthetic import ChainSpec

            _require(self.task == "synthetic", "data.synthetic", f"sets the synthetic task's chains; data.task is {self.task!r}")
            try:
                ChainSpec.from_mapping(self.synthetic)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"data.synthetic.{exc}") from None


@dataclass(frozen=True)
class EvalConfig:
    benchmarks: tuple[str, ...] = (
        "numinamath_olympiads", "hmmt_nov_2025", "math_level5", "strategyqa", "acereason_math",
        "sciknoweval_chemistry", "sciknoweval_biology", "sciknoweval_materials", "sciknoweval_physics",
        "commonsenseqa",
    )
    items_per_benchmark: int = 500
    every_steps: int = 0  # 0: only before and after training
    temperature: float = 0.0
    batch_size: int = 64

    def __post_init__(self):
        _require(self.items_per_benchmark > 0, "eval.items_per_benchmark", "must be > 0")
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(self.temperature >= 0, "eval.temperature", "must be >= 0")
        _require(self.batch_size > 0, "eval.batch_size", "must be > 0")


@dataclass(frozen=True)
class Config:
    name: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: dict = field(default_factory=dict)  # per-step scheduler requests (flows, SLURM)

    def __post_init__(self):
        losses = self.method.spec.losses
        _require(self.loss.loss in losses, "loss.loss", f"method {self.method.method} trains with {' or '.join(losses)}")
        _require(
            not (self.rollout.scheduler == "events" and self.rollout.engine == "vllm" and self.method.resolved_localizer == "divergence"), "rollout.scheduler",
            "events on vLLM's engine loop cannot run the divergence localizer (its teacher-forced pass would drain the engine loop under the running requests): "
            "use rollout.scheduler: batched, or another localizer",
        )  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def override(self, **dotted: Any) -> "Config":
        """`cfg.override(**{"method.method": "grpo"})`: a new validated config."""
        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, key, value, Config)
        return from_dict(data)


def _set_dotted(data: dict, key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node, typ = data, cls
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
        if fields is not None and part not in fields:
            raise ConfigError(f"{key}: unknown key {part!r}{_suggest(part, fields)}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            typ = typing.get_type_hints(typ)[part] if fields is not None else dict


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is Any or typ is dict or origin is dict:
        _require(isinstance(value, dict) or typ is Any, key, f"expected a mapping, got {type(value).__name__}")
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {type(value).__name__}")
        args = typing.get_args(typ)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None:
            _require(len(value) == len(args), key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for t in typing.get_args(typ):
            if t is type(None) and value is None:
                return None
            try:
                return _coerce(value, t, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if typ is bool:
        _require(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if typ is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if typ is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if typ is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    _require(isinstance(data, dict), prefix or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key{_suggest(str(key), names)}")
        typ = hints[key]
        kwargs[key] = _build(typ, value, dotted) if dataclasses.is_dataclass(typ) else _coerce(value, typ, dotted)
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    return _build(Config, data, "")


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line number, from YAML's node marks."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                dotted = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[dotted] = k.start_mark.line + 1
                walk(v, dotted)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def preset_path(name: str) -> Path | None:
    p = resources.files("srpo_core") / "presets" / f"{name}.yaml"
    return Path(str(p)) if p.is_file() else None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("srpo_core") / "presets").iterdir() if p.name.endswith(".yaml"))


RUNTIME_KEYS = (
    "resources",
    "rollout.server_url",
    "rollout.lora_dir",
    "train.processes",
    "model.threads",
    "train.share_prefix_forward",
)  # where and how fast, not what (shared forwards change results by float32 reordering only)


def results_config(data: dict) -> dict:
    """A config dict without the settings that only place or pace the work (scheduler requests,
    the inference server, learner processes, CPU threads): what a checkpoint's config hash covers,
    so a training may resume with more memory, another GPU count or a server."""
    out = json.loads(json.dumps(data))
    for key in RUNTIME_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML file, or else the preset of that name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    found = preset_path(name_or_path)
    if found is None:
        raise ConfigError(f"config {name_or_path!r}: no such file and no preset of that name (presets: {', '.join(preset_names())})")
    return found


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs -> dotted overrides, values read as YAML (`lr=1e-5` is a float)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _NUMBER.fullmatch(parsed.strip()):  # YAML 1.1 reads 1e-3 as a string
            parsed = float(parsed)
        out[key] = parsed
    return out


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _merged(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section (nested mappings merged, every other value replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_data(text: str, where: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config YAML's mapping, with `extends: <preset or file>` resolved: the named config's
    mapping with this one's keys over it (nested sections merged key by key; `name` is this one's)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a config is a mapping of sections, got {type(data).__name__}")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{where}: extends: a preset name or a YAML file, got {base_name!r}")
    base_path = resolve_config_path(base_name).resolve()
    if base_path in _chain:
        raise ConfigError(f"{where}: extends {base_name!r} loops back: {' -> '.join(p.stem for p in (*_chain, base_path))}")
    base = read_config_data(base_path.read_text(encoding="utf-8"), base_path, (*_chain, base_path))
    base.pop("name", None)
    return _merged(base, data)


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> Config:
    """Load a preset by name or a YAML file (`extends:` resolved), then apply dotted overrides."""
    path = resolve_config_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    data = read_config_data(text, path, (path.resolve(),))
    data.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value, Config)
    try:
        return from_dict(data)
    except ConfigError as exc:
        msg = str(exc)
        key = msg.split(":", 1)[0].split("[", 1)[0]
        line = _key_lines(text).get(key)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {msg}") from None
