"""LoRA learner: the base model frozen, a peft LoRA adapter trained with AdamW on the loss of
algos.py. Mini-batches of prompts give one optimizer step each (gradient accumulation over
micro-batches inside), training log-probs use logits / rollout temperature, and device placement
goes through accelerate, so the same code runs on a CPU and on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from srpo_core import algos

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
        from accelerate import Accelerator
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.tokenizer = load_tokenizer(model_path)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        if gradient_checkpointing:
            base.gradient_checkpointing_enable()
        if adapter_path:
            model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
        else:
            target = lora.target_modules if lora.target_modules == "all-linear" else [m.strip() for m in lora.target_modules.split(",")]
            model = get_peft_model(base, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.grad_clip = optim.grad_clip
        self.temperature = temperature
        self.loss_fn = algos.LOSSES[loss]
        self.loss_kwargs = dict(loss_kwargs or {})
        self.optimizer_steps = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _tensors(self, seqs: list[TrainSequence]):
        """Right-padded ids [M, L] and, in next-token coordinates [M, L-1]: targets, active mask,
        old log-probs."""
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
        dev = self.device
        return ids.to(dev), attn.to(dev), ids[:, 1:].to(dev), mask.to(dev), old.to(dev)

    def update(self, seqs: list[TrainSequence], mini_batch_prompts: int, micro_batch_sequences: int, update_epochs: int = 1) -> dict[str, float]:
        """One training step: mini-batches of prompts, one optimizer step each."""
        self.model.train()
        prompts = sorted({s.prompt_index for s in seqs})
        minis = [set(prompts[i : i + mini_batch_prompts]) for i in range(0, len(prompts), mini_batch_prompts)]
        losses, norms, tokens = [], [], 0
        for _ in range(update_epochs):
            for mini in minis:
                batch = [s for s in seqs if s.prompt_index in mini]
                live = [s for s in batch if s.advantage != 0.0]  # A = 0 contributes no gradient
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for j in range(0, len(live), micro_batch_sequences):
                    micro = live[j : j + micro_batch_sequences]
                    ids, attn, targets, mask, old = self._tensors(micro)
                    logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
                    logp = algos.token_logprobs(logits, targets, self.temperature)  # [M, L-1]
                    adv = torch.tensor([s.advantage for s in micro], device=logp.device)
                    loss = self.loss_fn(logp, old, adv, mask, **self.loss_kwargs).sum() / len(batch)
                    self.accelerator.backward(loss)
                    total += float(loss.detach())
                    tokens += int(mask.sum())
                if live:
                    norm = self.accelerator.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
                    self.optimizer.step()
                    self.optimizer_steps += 1
                    norms.append(float(norm))
                losses.append(total)
        self.model.eval()
        return {
            "learner/loss": sum(losses) / max(len(losses), 1),
            "learner/grad_norm": sum(norms) / len(norms) if norms else 0.0,
            "learner/optimizer_steps": float(len(norms)),
            "learner/active_tokens": float(tokens),
            "learner/sequences": float(len(seqs)),
        }

    def save_adapter(self, path: str | Path) -> Path:
        path = Path(path)
        self.accelerator.unwrap_model(self.model).save_pretrained(str(path))
        return path

    def save_optimizer(self, path: str | Path) -> Path:
        torch.save({"optimizer": self.optimizer.state_dict(), "optimizer_steps": self.optimizer_steps}, str(path))
        return Path(path)

    def load_optimizer(self, path: str | Path) -> None:
        state = torch.load(str(path), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_steps = int(state["optimizer_steps"])

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters() if "lora_" in k}

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters() if "lora_" not in k}

