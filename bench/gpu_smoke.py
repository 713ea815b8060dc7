"""GPU smoke test of the serving path, with timings:

    python bench/gpu_smoke.py                      # one GPU: HF engine, and vLLM if importable
    python bench/gpu_smoke.py --device cpu         # the same on CPU (slow, float32, HF only)

Builds a small model of a real architecture from a config (Qwen2: GQA, untied-capable, RoPE;
random weights, the package's character tokenizer), then for each engine: start the inference
server (`start_server`), load adapter v1 (saved by an in-process LoRA learner), run the
weight-sync canary, sample rollouts, take one learner step, save and hot-load v2, canary again,
and check that the canary flags the now-stale v1. With several GPUs (or `--learner-processes N`),
one learner step of the flow's multi-process path too (`distributed.learn`: FSDP2 under torchrun,
NCCL), with its canary reference. Prints a timing table, the measured canary diffs (use them to
calibrate the bf16 tolerance, see srpo_core/server/canary.py) and writes `--out/gpu_smoke.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--engines", default="auto", help="comma list of hf,vllm (auto: hf, plus vllm on a GPU where importable)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-thought-tokens", type=int, default=32)
    p.add_argument("--learner-processes", type=int, default=0, help="FSDP learner processes (0: every GPU when there are 2 or more, else skipped)")
    p.add_argument("--out", default=None, help="output dir (default: a temp dir)")
    return p.parse_args(argv)


def build_model(out: Path, args, dtype) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from srpo_core.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    vocab = (len(tok) + 63) // 64 * 64
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    path = out / "qwen2-smoke"
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(str(path))
    return path


class Timer:
    def __init__(self):
        self.rows: list[tuple[str, str, float, str]] = []

    def __call__(self, engine: str, what: str, fn, note=lambda r: ""):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        self.rows.append((engine, what, dt, note(result)))
        print(f"  [{engine}] {what:<28} {dt:8.3f}s  {note(result)}", flush=True)
        return result


def train_step(learner, engine, prompts, limits, seed):
    from srpo_core.engine.base import SamplingParams, ThoughtRequest
    from srpo_core.learner import TrainSequence

    out = engine.generate_thoughts([ThoughtRequest(tuple(p), n=2) for p in prompts], limits, SamplingParams(temperature=1.0, seed=seed))
    seqs = [TrainSequence(r.prompt_ids, r.response_ids, 0, 1.0 if k % 2 else -1.0, r.logprobs, i) for i, g in enumerate(out) for k, r in enumerate(g)]
    return learner.update(seqs, len(prompts), 16)


def run_engine(kind: str, model_path: Path, learner, args, dtype_name: str, device: str, work: Path, timer: Timer) -> dict:
    from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
    from srpo_core.server import StaleAdapterError, adapter_sha256, canary_check, start_server

    limits = ThoughtLimits(max_thoughts=4, max_thought_tokens=args.max_thought_tokens, max_response_tokens=4 * args.max_thought_tokens, max_model_len=1024)
    extra = ["--max-lora-rank", str(max(16, args.lora_r)), "--gpu-memory-utilization", "0.4", "--max-model-len", "1024"] if kind == "vllm" else []
    res: dict = {"engine": kind}
    server = timer(
        kind,
        "start server (to /ready)",
        lambda: start_server(str(model_path), engine=kind, dtype=dtype_name, device=device if kind == "hf" else None, workdir=work / f"server-{kind}", extra_args=extra, ready_timeout=900),
    )
    try:
        eng = server.engine()
        v1 = learner.save_adapter(work / f"{kind}-v1")
        timer(kind, "load adapter v1", lambda: eng.load_adapter(str(v1), "v1"))
        c1 = timer(kind, "canary v1", lambda: canary_check(eng, learner, "v1", expected_sha256=adapter_sha256(v1)), lambda r: f"max|d|={r.max_abs_diff:.2e} mean={r.mean_abs_diff:.2e} tol={r.tol:g}")
        prompts = [eng.encode(f"Q:{i}*{i + 3}-{i % 7}+{i % 5}|") for i in range(args.prompts)]
        reqs = [ThoughtRequest(tuple(p), n=args.n) for p in prompts]
        sampling = SamplingParams(temperature=1.0, seed=0)
        timer(kind, "rollouts (warm-up)", lambda: eng.generate_thoughts(reqs[:1], limits, sampling))
        out = timer(kind, f"rollouts {args.prompts}x{args.n}", lambda: eng.generate_thoughts(reqs, limits, sampling), lambda o: f"{sum(r.generated_tokens for g in o for r in g)} tokens")
        assert all(r.adapter_version == "v1" for g in out for r in g)
        tokens = sum(r.generated_tokens for g in out for r in g)
        res["rollout_tokens_per_s"] = tokens / timer.rows[-1][2]
        timer(kind, "learner step", lambda: train_step(learner, eng, prompts[:4], limits, 1), lambda m: f"loss={m['learner/loss']:.3g} grad_norm={m['learner/grad_norm']:.3g}")
        v2 = learner.save_adapter(work / f"{kind}-v2")
        timer(kind, "load adapter v2 (hot)", lambda: eng.load_adapter(str(v2), "v2"))
        c2 = timer(kind, "canary v2", lambda: canary_check(eng, learner, "v2", expected_sha256=adapter_sha256(v2)), lambda r: f"max|d|={r.max_abs_diff:.2e} mean={r.mean_abs_diff:.2e}")
        try:
            canary_check(eng, learner, "v1")
            stale = "NOT detected by log-probs (below the dtype tolerance; the sha256 check catches it)"
        except StaleAdapterError as exc:
            stale = f"detected (max|d|={exc.max_abs_diff:.2e})"
        print(f"  [{kind}] stale v1 after the step: {stale}")
        res.update(canary_v1=c1.__dict__, canary_v2=c2.__dict__, stale_v1=stale)
    finally:
        timer(kind, "stop server", server.stop)
    return res


def fsdp_step(model_path: Path, learner, engine, args, dtype_name: str, processes: int, work: Path, timer: Timer) -> dict:
    """One learner step through the flow's path with `processes` FSDP2 processes, from v1 of the
    in-process learner, compared with the in-process learner taking the same step."""
    from srpo_core.config import load_config
    from srpo_core.distributed import learn
    from srpo_core.engine.base import SamplingParams, ThoughtLimits, ThoughtRequest
    from srpo_core.learner import TrainSequence

    limits = ThoughtLimits(max_thoughts=4, max_thought_tokens=args.max_thought_tokens, max_response_tokens=4 * args.max_thought_tokens, max_model_len=1024)
    prompts = [engine.encode(f"Q:{i}*{i + 5}-{i % 3}|") for i in range(8)]
    out = engine.generate_thoughts([ThoughtRequest(tuple(p), n=4) for p in prompts], limits, SamplingParams(temperature=1.0, seed=7))
    seqs = [TrainSequence(r.prompt_ids, r.response_ids, 0, 1.0 if k % 2 else -1.0, r.logprobs, i) for i, g in enumerate(out) for k, r in enumerate(g)]
    start = work / "fsdp-start"
    learner.save_adapter(start / "adapter")
    learner.save_optimizer(start / "optimizer.pt")
    cfg = load_config(
        "tiny",
        {
            "model.name_or_path": str(model_path),
            "model.dtype": dtype_name,
            "model.threads": 0,
            "lora.r": args.lora_r,
            "lora.alpha": 2 * args.lora_r,
            "optim.lr": 1e-3,
            "train.processes": processes,
            "train.mini_batch_prompts": 8,
            "train.prompts_per_step": 8,
        },
    )
    metrics = timer(
        f"fsdp x{processes}",
        "learner step (torchrun)",
        lambda: learn(cfg, seqs, start, work / "fsdp-out", 0, canary_path=work / "fsdp-canary.json"),
        lambda m: f"loss={m['learner/loss']:.3g} grad_norm={m['learner/grad_norm']:.3g}",
    )
    single = learner.update(seqs, 8, 16)
    from safetensors.torch import load_file

    theirs = load_file(str(work / "fsdp-out" / "adapter" / "adapter_model.safetensors"))
    mine = {k.replace(".default", ""): v.detach().float().cpu() for k, v in learner.lora_state().items()}
    diff = max((theirs[k].float() - mine[k]).abs().max().item() for k in theirs)
    print(f"  [fsdp x{processes}] max |LoRA(FSDP) - LoRA(one process)| after the same step: {diff:.2e}; grad_norm {metrics['learner/grad_norm']:.4g} vs {single['learner/grad_norm']:.4g}")
    return {"engine": f"fsdp x{processes}", "metrics": metrics, "lora_max_abs_diff_vs_single": diff, "single_grad_norm": single["learner/grad_norm"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: learner and server on CPU
    import torch

    from srpo_core.config import LoraConfig, OptimConfig
    from srpo_core.engine.base import ThoughtLimits
    from srpo_core.engine.hf import HFEngine
    from srpo_core.engine.vllm import vllm_import_error
    from srpo_core.learner import Learner

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = "bfloat16" if device == "cuda" else "float32"
    engines = ["hf"] + (["vllm"] if device == "cuda" and vllm_import_error() is None else []) if args.engines == "auto" else args.engines.split(",")
    work = Path(args.out or tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"device={device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}) dtype={dtype_name} engines={engines} out={work}")
    if "vllm" not in engines and device == "cuda":
        print(f"  vllm skipped: {vllm_import_error()}")
    timer = Timer()
    path = timer("-", "build Qwen2 model", lambda: build_model(work, args, getattr(torch, dtype_name)))
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r)
    learner = timer("-", "learner init", lambda: Learner(str(path), lora, OptimConfig(lr=1e-3), dtype=dtype_name, temperature=1.0))
    local = HFEngine(learner.model, learner.tokenizer)  # a first step, so v1 is not the identity adapter
    warm_limits = ThoughtLimits(max_thoughts=2, max_thought_tokens=16, max_response_tokens=32, max_model_len=256)
    timer("-", "first learner step", lambda: train_step(learner, local, [local.encode(f"Q:{i}+{i}|") for i in range(4)], warm_limits, 0))
    results = [run_engine(kind, path, learner, args, dtype_name, device, work, timer) for kind in engines]
    procs = args.learner_processes or (torch.cuda.device_count() if device == "cuda" and torch.cuda.device_count() > 1 else 0)
    if procs > 1:
        results.append(fsdp_step(path, learner, local, args, dtype_name, procs, work, timer))
    if device == "cuda":
        print(f"peak GPU memory (this process): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print("\n| engine | step | seconds | note |\n|---|---|---|---|")
    for row in timer.rows:
        print(f"| {row[0]} | {row[1]} | {row[2]:.3f} | {row[3]} |")
    (work / "gpu_smoke.json").write_text(json.dumps({"device": device, "dtype": dtype_name, "timings": timer.rows, "results": results}, indent=2, default=str))
    print(f"wrote {work / 'gpu_smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
