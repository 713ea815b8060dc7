"""The process runtime every model-holding part shares: CPU threads, model paths, tokenizer, and
the one loader of a model with its adapter (used by the flow's phases, the inference server, the
learner and the plain loop), plus the rollout engine a config names (`rollout.engine`).

Contract
    load_model(path, dtype, adapter_dir=None, trainable=False) -> the causal LM (a PeftModel when
        an adapter directory is given), weights-only, evaluation mode unless trainable.
    build_engine(cfg, adapter_dir=None, version=None) -> a RolloutEngine of `rollout.engine`:
        "hf" (transformers, in this process), "vllm" (vLLM's offline engine with the adapter as a
        LoRA request) or "openai" (the stock vLLM server at `rollout.server_url`, the adapter
        loaded there). The caller never branches on the engine name.
    server_client(cfg, url) -> the client of the inference server at `url` the phases call: ours
        (`RemoteEngine`), or with `rollout.engine: openai` a stock vLLM server (`OpenAIEngine`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from srpo_core.config import Config
    from srpo_core.engine.base import RolloutEngine

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")


def torch_dtype(name: str):
    """`model.dtype` -> the torch dtype ("auto": transformers' choice)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def set_threads(cfg: "Config") -> None:
    """`model.threads` torch CPU threads for this process (0: torch's default)."""
    import torch

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:NAME` -> the shipped checkpoint directory; anything else unchanged."""
    from srpo_core.tiny.build import resolve_model_path as resolve

    return resolve(name_or_path)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str, dtype: str, adapter_dir: str | None = None, *, device: str | None = None, trainable: bool = False):
    """The base model at `path` (a local directory or hub id) in `dtype` on `device` (default: CUDA
    when present), with the peft adapter of `adapter_dir` on top when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device or default_device())
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    return model if trainable else model.eval()


def vllm_options(cfg: "Config"):
    from srpo_core.engine.vllm import VLLMOptions

    return VLLMOptions(dtype=cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16", max_model_len=cfg.model.max_model_len, max_lora_rank=cfg.lora.r, seed=cfg.train.seed)


def server_client(cfg: "Config", url: str):
    """The client of the inference server at `url`: `RemoteEngine` (ours: `python -m
    srpo_core.server`), or with `rollout.engine: openai` an `OpenAIEngine` (a stock `vllm serve`,
    encoding and decoding with the local tokenizer of `model.name_or_path`). Both offer
    `check_ready()` and `load_adapter(source, version, sha256)`."""
    if cfg.rollout.engine == "openai":
        from srpo_core.engine.openai_api import OpenAIEngine

        return OpenAIEngine(url, load_tokenizer(resolve_model_path(cfg.model.name_or_path)))
    from srpo_core.engine.remote import RemoteEngine

    return RemoteEngine(url)


def build_engine(cfg: "Config", adapter_dir: str | None = None, version: str | None = None) -> "RolloutEngine":
    """The rollout engine `rollout.engine` names, holding the policy base + `adapter_dir`."""
    if cfg.rollout.engine == "openai":  # the vLLM server reads `adapter_dir` itself: the same path on both machines
        from srpo_core.server.adapters import adapter_sha256

        engine = server_client(cfg, cfg.rollout.server_url)
        engine.check_ready()
        if adapter_dir is not None:
            engine.load_adapter(adapter_dir, version or "adapter", adapter_sha256(adapter_dir))
        engine.adapter_version = version
        return engine
    path = resolve_model_path(cfg.model.name_or_path)
    if cfg.rollout.engine == "vllm":
        from srpo_core.engine.vllm import VLLMEngine

        engine = VLLMEngine(path, vllm_options(cfg), adapter_version=version)
        if adapter_dir is not None:
            engine.use_adapter(engine.make_lora_request(version or "adapter", str(adapter_dir)), version)
        return engine
    from srpo_core.engine.hf import HFEngine

    set_threads(cfg)
    return HFEngine(load_model(path, cfg.model.dtype, adapter_dir), load_tokenizer(path), adapter_version=version)
