"""LoRA learner: the base model frozen, a peft LoRA adapter trained with AdamW on the loss of
algos.py. Mini-batches of prompts give one optimizer step each (gradient accumulation over
micro-batches inside), training log-probs use logits / rollout temperature.

One process (CPU or one GPU) or several under torchrun: when a process group exists the model is
sharded with FSDP2 (`fsdp.shard_model`) and each mini-batch's sequences are split over the
processes by `plan_micro_batches` (same number of micro-batches everywhere: an FSDP forward is a
collective; a process short of work runs a zero-weight micro-batch). Micro-batches hold at most
`micro_batch_sequences` sequences and, with `micro_batch_tokens`, at most that many padded tokens
(sequences sorted by length so padding stays small).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from srpo_core import algos
from srpo_core import fsdp as D

LOGPROB_CHUNK_TOKENS = 1024  # algos.token_logprobs: the float32 softmax of ~1k tokens at a time (docs/memory.md)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass(frozen=True)
class TrainSequence:
    prompt_ids: list[int]
    response_ids: list[int]
    prefix_len: int  # masked leading response tokens (reset prefix)
    advantage: float
    old_logprobs: list[float]  # rollout log-probs of the generated tokens (len = response - prefix)
    prompt_index: int  # which prompt of the step (mini-batches are formed over prompts)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class Learner:
    def __init__(self, model_path: str, lora, optim, dtype: str = "float32", temperature: float = 1.0, loss: str = "pg", loss_kwargs: dict | None = None, gradient_checkpointing: bool = False, adapter_path: str | None = None):
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        self.rank, self.world = D.world()
        self.tokenizer = load_tokenizer(model_path)
        skeleton = self.world > 1 and self.rank != 0  # FSDP: only rank 0 reads the weights, then broadcasts them
        if skeleton:
            from accelerate import init_empty_weights
            from transformers import AutoConfig

            with init_empty_weights():  # parameters on the meta device (no memory), buffers real
                base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=DTYPES[dtype])
            base.tie_weights()  # init_empty_weights re-creates each parameter, which unties embeddings
        else:
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        if gradient_checkpointing:
            base.gradient_checkpointing_enable()
        if adapter_path and not skeleton:
            model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
        elif adapter_path:  # the same LoRA layout; its weights come from rank 0
            peft_cfg = PeftConfig.from_pretrained(adapter_path)
            peft_cfg.inference_mode = False
            model = get_peft_model(base, peft_cfg)
        else:
            target = lora.target_modules if lora.target_modules == "all-linear" else [m.strip() for m in lora.target_modules.split(",")]
            model = get_peft_model(base, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"))
        self.model = D.shard_model(model) if self.world > 1 else model.to(D.device())
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.grad_clip = optim.grad_clip
        self.temperature = temperature
        self.loss_fn = algos.LOSSES[loss]
        self.loss_kwargs = dict(loss_kwargs or {})
        self.optimizer_steps = 0

    @property
    def device(self) -> torch.device:
        return D.device()

    def _tensors(self, seqs: list[TrainSequence]):
        """Right-padded ids [M, L]; in next-token coordinates from the first trained position `s0`
        on ([M, L-1-s0]): targets, active mask, old log-probs; and K = L - s0, the positions whose
        logits are needed (prompt and reset-prefix logits are never computed)."""
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        old = torch.zeros((len(seqs), width - 1))
        for i, s in enumerate(seqs):
            full = s.prompt_ids + s.response_ids
            ids[i, : len(full)] = torch.tensor(full)
            attn[i, : len(full)] = 1
            start = len(s.prompt_ids) + s.prefix_len - 1
            old[i, start : start + len(s.old_logprobs)] = torch.tensor(s.old_logprobs)
        p = torch.tensor([len(s.prompt_ids) for s in seqs])
        mask = algos.response_mask(p + torch.tensor([s.prefix_len for s in seqs]) - 1, p + torch.tensor([len(s.response_ids) for s in seqs]) - 1, width - 1)
        s0 = min(len(s.prompt_ids) + s.prefix_len - 1 for s in seqs)
        dev = self.device
        return ids.to(dev), attn.to(dev), ids[:, 1 + s0 :].to(dev), mask[:, s0:].to(dev), old[:, s0:].to(dev), width - s0

    def update(self, seqs: list[TrainSequence], mini_batch_prompts: int, micro_batch_sequences: int, update_epochs: int = 1, micro_batch_tokens: int = 0) -> dict[str, float]:
        """One training step: mini-batches of prompts, one optimizer step each. Under a process
        group every process gets all `seqs` and trains on its share."""
        self.model.train()
        prompts = sorted({s.prompt_index for s in seqs})
        minis = [set(prompts[i : i + mini_batch_prompts]) for i in range(0, len(prompts), mini_batch_prompts)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss over mini-batches, active tokens, micro-batches
        norms = []
        for _ in range(update_epochs):
            for mini in minis:
                batch = [s for s in seqs if s.prompt_index in mini]
                live = [s for s in batch if s.advantage != 0.0]  # A = 0 contributes no gradient
                if not live:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                plan = plan_micro_batches([len(s.prompt_ids) + len(s.response_ids) for s in live], self.world, micro_batch_sequences, micro_batch_tokens)
                mine = plan[self.rank]
                for j, idx in enumerate(mine):
                    micro = [live[i] for i in idx] or [live[0]]  # an empty slot: zero-weight work
                    weight = self.world / len(batch) if idx else 0.0
                    if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP: reduce once, after the last
                        self.model.set_requires_gradient_sync(j == len(mine) - 1)
                    ids, attn, targets, mask, old, keep = self._tensors(micro)
                    logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]  # [M, K-1, V]
                    logp = algos.token_logprobs(logits, targets, self.temperature, LOGPROB_CHUNK_TOKENS)  # [M, K-1]
                    adv = torch.tensor([s.advantage for s in micro], device=logp.device)
                    loss = self.loss_fn(logp, old, adv, mask, **self.loss_kwargs).sum() * weight
                    loss.backward()
                    real = 1.0 if idx else 0.0  # kept on the device: no synchronisation per micro-batch
                    sums += torch.stack([loss.detach().double() / self.world, mask.sum().double() * real, torch.tensor(real, dtype=torch.float64, device=self.device)])
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                self.optimizer.step()
                self.optimizer_steps += 1
                norms.append(float(D.full(norm)))
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        loss_sum, tokens, micro_batches = sums.tolist()
        self.model.eval()
        return {
            "learner/loss": loss_sum / max(len(minis) * update_epochs, 1),
            "learner/grad_norm": sum(norms) / len(norms) if norms else 0.0,
            "learner/optimizer_steps": float(len(norms)),
            "learner/active_tokens": tokens,
            "learner/micro_batches": micro_batches,
            "learner/sequences": float(len(seqs)),
        }

    def save_adapter(self, path: str | Path) -> Path:
        """peft's adapter directory (rank 0 writes it; every process must call this under FSDP)."""
        path = Path(path)
        lora = {k: D.full(v).detach().cpu() for k, v in self.model.named_parameters() if v.requires_grad}
        if self.rank == 0:
            self.model.save_pretrained(str(path), state_dict=lora)
        return path

    def save_optimizer(self, path: str | Path) -> Path:
        """AdamW state keyed by parameter name, whole tensors: loadable with any process count."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            torch.save({"optimizer": state, "optimizer_steps": self.optimizer_steps}, str(path))
        return Path(path)

    def load_optimizer(self, path: str | Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.optimizer_steps = int(state["optimizer_steps"])

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k: D.full(v).detach().clone() for k, v in self.model.named_parameters() if "lora_" in k}

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: D.full(v).detach().clone() for k, v in self.model.named_parameters() if "lora_" not in k}


def learner_from_config(cfg, adapter_path: str | None = None) -> Learner:
    """The learner a config describes (model, LoRA, optimizer, loss, rollout temperature)."""
    from srpo_core.tiny.build import resolve_model_path

    return Learner(resolve_model_path(cfg.model.name_or_path), cfg.lora, cfg.optim, dtype=cfg.model.dtype, temperature=cfg.rollout.temperature, loss=cfg.loss.loss, loss_kwargs={"clip_eps": cfg.loss.clip_eps, "dual_clip": cfg.loss.dual_clip}, gradient_checkpointing=cfg.train.gradient_checkpointing, adapter_path=adapter_path)


def plan_micro_batches(lengths: list[int], world: int, max_sequences: int, max_tokens: int = 0) -> list[list[list[int]]]:
    """Micro-batches of sequence indices for each of `world` processes, the same count for all
    (the short ones get empty slots). Sequences are taken longest first; a micro-batch holds at
    most `max_sequences` and, if `max_tokens` > 0, at most `max_tokens` padded tokens
    (size x longest; a longer single sequence goes alone). Micro-batches are dealt round-robin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    micros: list[list[int]] = []
    for i in order:
        cur = micros[-1] if micros else None
        fits = cur is not None and len(cur) < max_sequences and (max_tokens <= 0 or lengths[cur[0]] * (len(cur) + 1) <= max_tokens)
        if fits:
            cur.append(i)
        else:
            micros.append([i])
    per_rank = -(-len(micros) // world) if micros else 0
    plan = [micros[r::world] for r in range(world)]
    return [p + [[] for _ in range(per_rank - len(p))] for p in plan]
