"""FSDP2 primitives of the learner: the process group torchrun describes, the device, sharding a
peft model (`torch.distributed.fsdp.fully_shard`, one unit per decoder layer), whole tensors of
sharded parameters and the step's peak memory. Used by `learner` (the model) and `distributed`
(the torchrun launcher); imports neither.

Rank 0 loads the base model, the other processes build a meta-device skeleton of it, peft adds
LoRA, and `shard_model` wraps each decoder layer and then the root in its own FSDP2 unit and
broadcasts rank 0's weights into the shards; parameters are sharded one by one (DTensor), so a bf16
base beside fp32 LoRA weights is fine: the mixed-precision policy all-gathers in the base dtype and
reduces gradients in fp32.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...): NCCL on GPUs,
    gloo on CPUs."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        dist.init_process_group("nccl", device_id=device())
    else:
        dist.init_process_group("gloo")


def resolve_processes(processes: int) -> int:
    """`train.processes`: 0 means one per visible GPU (one on a machine without GPUs)."""
    return processes if processes > 0 else max(torch.cuda.device_count(), 1)


def layer_classes(model) -> set[str]:
    """Class names of the decoder layers (transformers' `_no_split_modules`): one FSDP unit each."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(inner).__name__} does not name its decoder layers (_no_split_modules); cannot shard it with FSDP")
    return names


def shard_model(model):
    """FSDP2 in place: each decoder layer its own unit, the rest (embeddings, final norm, lm_head) the
    root unit. Frozen parameters in a lower precision set the all-gather dtype; gradients reduce in
    fp32. Rank 0 holds the real weights, the other ranks a meta-device skeleton of the same model:
    rank 0's full state is broadcast and each rank keeps its shard (host memory: one copy per node,
    not one per GPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full_state = model.state_dict() if world()[0] == 0 else {}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad} or {torch.float32}
    compute = min(frozen, key=lambda d: torch.finfo(d).bits)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != torch.float32 else MixedPrecisionPolicy()
    names = layer_classes(model)
    for module in model.modules():  # fully_shard moves each unit's parameters and buffers to the GPU
        if type(module).__name__ in names:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if any(p.is_meta for p in model.parameters()):  # a skeleton: allocate its shards, keep its (real) buffers
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.to_empty(device=device())
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    # copied in place (no `assign`), so tied weights stay tied and FSDP keeps its parameters
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or value; a collective under FSDP."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def peak_memory() -> dict[str, float]:
    """The step's peak memory, the largest over the processes: allocated GPU memory on CUDA, else
    the resident set size (Linux; this process's lifetime peak)."""
    import resource

    if torch.cuda.is_available():
        name, value = "learner/peak_gpu_memory_gb", torch.cuda.max_memory_allocated() / 1e9
    else:
        name, value = "learner/peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if world()[1] > 1:
        t = torch.tensor([value], dtype=torch.float64, device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = float(t.item())
    return {name: value}
