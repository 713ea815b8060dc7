"""LoRA learner: the base model frozen, a peft LoRA adapter trained with AdamW on the loss of
algos.py. Mini-batches of prompts give one optimizer step each (gradient accumulation over
micro-batches inside), training log-probs use logits / rollout temperature.

One process (CPU or one GPU) or several under torchrun: when a process group exists the model is
sharded with FSDP2 (`fsdp.shard_model`) and each mini-batch's sequences are split over the
processes by `plan_micro_batches` (same number of micro-batches everywhere: an FSDP forward is a
collective; a process short of work runs a zero-weight micro-batch). Micro-batches hold at most
`micro_batch_sequences` sequences and, with `micro_batch_tokens`, at most that many padded tokens
(sequences sorted by length so padding stays small).

Shared contexts are forwarded once (`share_prefix_forward`, default on). The context of a sequence
is what its trained tokens are conditioned on and none of it is trained: prompt + reset prefix
(x* of a shared-prefix group; the prompt alone for a base rollout). Sequences of a prompt with the
same context form a group (`shared_contexts`), kept in one micro-batch where it fits. Such a
micro-batch runs two forwards: the contexts, one row each [C, Lc], recording every layer's keys
and values (`_PrefixCache`); then the suffixes [R, Ls], each row reading its context's keys and
values expanded to the row (index_select, whose backward sums the rows' contributions), at
positions continuing the context's. The first trained token's logit is the context row's last
one. Same loss and gradients as R full sequences (up to float32 reduction order): every gradient
reaches the context computation through the expanded keys/values and the first logits. Composes
with gradient checkpointing (the suffix pass only reads the cache; the context pass assigns, so a
replay in backward stores the same tensors again) and FSDP (two forwards per micro-batch on every
process, empty slots included).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from srpo_core import algos
from srpo_core import fsdp as D
from srpo_core.runtime import load_model, load_tokenizer, torch_dtype

REFERENCE_MICRO_SEQUENCES = 8  # sequences per no-grad forward of the reference policy (reference_logprobs)
LOGPROB_CHUNK_TOKENS = 1024  # algos.token_logprobs: the float32 softmax of ~1k tokens at a time (docs/memory.md)


@dataclass(frozen=True)
class TrainSequence:
    prompt_ids: list[int]
    response_ids: list[int]
    prefix_len: int  # masked leading response tokens (reset prefix)
    advantage: float
    old_logprobs: list[float]  # rollout log-probs of the generated tokens (len = response - prefix)
    prompt_index: int  # which prompt of the step (mini-batches are formed over prompts)
    token_advantages: tuple[float, ...] | None = None  # token-level credits of the trained tokens (len = response - prefix); None: `advantage` on every token
    loss: str = ""  # an algos.LOSSES name for this sequence ("": the learner's configured loss)
    loss_kwargs: tuple[tuple[str, float], ...] = ()  # keyword arguments of its loss over the configured ones (e.g. Critique-GRPO's gamma)
    kl_coef: float = 0.0  # > 0: `advantage` is reduced by kl_coef * mean_t (log pi_old - log pi_ref) before the update (reference_kl_advantages)

    @property
    def has_signal(self) -> bool:
        return any(self.token_advantages) if self.token_advantages is not None else self.advantage != 0.0

    @property
    def context(self) -> tuple[int, ...]:
        """The tokens the trained ones are conditioned on, none of them trained: prompt + reset prefix."""
        return (*self.prompt_ids, *self.response_ids[: self.prefix_len])


def shared_contexts(seqs: list[TrainSequence]) -> list[list[int]]:
    """Indices of `seqs` grouped by prompt and identical context (prompt + reset prefix), groups
    in order of first appearance; a sequence alone in its group shares nothing. The G suffixes of a
    shared-prefix group form one group, as do a prompt's base rollouts (their context is the prompt)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault((s.prompt_index, s.context), []).append(i)
    return list(groups.values())


class _PrefixCache:
    """The key/value cache of a shared-context forward (a transformers `DynamicCache` with `update`
    replaced; the `_make` factory builds the subclass lazily so this module imports no transformers).

    record (`prefix` None): `update` keeps each layer's keys/values [C, H, Lc, D] by assignment and
    returns them unchanged (a gradient-checkpointing replay assigns the same values again);
    extend: `update` returns cat(prefix, new) along positions and stores nothing, so the pass is a
    pure function of its inputs (safe to replay). `layer_calls` counts the layers that used it."""

    _cls = None

    @classmethod
    def make(cls, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        if cls._cls is None:
            from transformers import DynamicCache

            class PrefixCache(DynamicCache):
                def __init__(self, prefix):
                    super().__init__()
                    self.prefix = prefix
                    self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
                    self.layer_calls: set[int] = set()

                def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                    self.layer_calls.add(layer_idx)
                    if self.prefix is None:
                        self.recorded[layer_idx] = (key_states, value_states)
                        return key_states, value_states
                    keys, values = self.prefix[layer_idx]
                    return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)

                def get_seq_length(self, layer_idx: int = 0) -> int:
                    return 0 if self.prefix is None else self.prefix[layer_idx][0].shape[-2]

                def get_mask_sizes(self, query_length, layer_idx: int = 0):
                    q = query_length if isinstance(query_length, int) else query_length.shape[0]  # older transformers pass cache_position
                    return self.get_seq_length(layer_idx) + q, 0

            cls._cls = PrefixCache
        return cls._cls(prefix)


class Learner:
    def __init__(
        self,
        model_path: str,
        lora,
        optim,
        dtype: str = "float32",
        temperature: float = 1.0,
        loss: str = "pg",
        loss_kwargs: dict | None = None,
        gradient_checkpointing: bool = False,
        adapter_path: str | None = None,
        share_prefix_forward: bool = True,
    ):
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
                base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch_dtype(dtype))
            base.tie_weights()  # init_empty_weights re-creates each parameter, which unties embeddings
        else:
            base = load_model(model_path, dtype, device="cpu", trainable=True)  # moved or sharded below
        if gradient_checkpointing:
            base.gradient_checkpointing_enable()
            for module in base.modules():  # the shared-context passes replay safely (see _PrefixCache)
                if hasattr(module, "_can_checkpoint_with_cache"):
                    module._can_checkpoint_with_cache = True
        self._cache_arg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"  # transformers 5 renamed it
        self._layers = base.config.get_text_config().num_hidden_layers
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
        for group in self.optimizer.param_groups:  # the base rate the warmup scales; saved with the optimizer
            group["initial_lr"] = optim.lr
        self.warmup_steps = optim.warmup_steps
        self.grad_clip = optim.grad_clip
        # transformers before _can_checkpoint_with_cache drop any cache under checkpointing: no sharing there
        self.share_prefix_forward = share_prefix_forward and (not gradient_checkpointing or any(hasattr(m, "_can_checkpoint_with_cache") for m in base.modules()))
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

    def _shared_tensors(self, seqs: list[TrainSequence]) -> dict[str, torch.Tensor]:
        """The two passes of a shared-context micro-batch. Units: the distinct contexts (C of them,
        in order of first appearance), rows: the sequences (R). Right-padded: ctx_ids, ctx_attn
        [C, Lc]; last [C] (each context's last position); row_unit [R]; suffix ids, suffix_attn
        (= the active mask), positions (continuing the context's), old log-probs [R, Ls]."""
        units: dict[tuple[int, ...], int] = {}
        row_unit = [units.setdefault(s.context, len(units)) for s in seqs]
        contexts = list(units)
        suffixes = [s.response_ids[s.prefix_len :] for s in seqs]
        ctx_width, suf_width = max(len(c) for c in contexts), max(1, max(len(x) for x in suffixes))
        pad = self.tokenizer.pad_token_id
        ctx_ids = torch.full((len(contexts), ctx_width), pad, dtype=torch.long)
        ctx_attn = torch.zeros_like(ctx_ids)
        for c, ctx in enumerate(contexts):
            ctx_ids[c, : len(ctx)] = torch.tensor(ctx)
            ctx_attn[c, : len(ctx)] = 1
        ids = torch.full((len(seqs), suf_width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        old = torch.zeros((len(seqs), suf_width))
        for r, (s, x) in enumerate(zip(seqs, suffixes)):
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            attn[r, : len(x)] = 1
            old[r, : len(s.old_logprobs[: len(x)])] = torch.tensor(s.old_logprobs[: len(x)], dtype=torch.float32)
        ctx_len = ctx_attn.sum(1)  # [C]
        row_unit_t = torch.tensor(row_unit)
        positions = ctx_len[row_unit_t][:, None] + torch.arange(suf_width)[None, :]  # [R, Ls]
        out = {"ctx_ids": ctx_ids, "ctx_attn": ctx_attn, "last": ctx_len - 1, "row_unit": row_unit_t, "ids": ids, "attn": attn, "positions": positions, "old": old}
        return {k: v.to(self.device) for k, v in out.items()}

    def _shared_logprobs(self, seqs: list[TrainSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs of the suffix tokens [R, Ls] from a context pass and a suffix pass (module
        docstring), with the old log-probs and the active mask [R, Ls]."""
        b = self._shared_tensors(seqs)
        record = _PrefixCache.make()
        keep = torch.unique(b["last"])  # sorted distinct last positions of the contexts
        ctx_logits = self.model(input_ids=b["ctx_ids"], attention_mask=b["ctx_attn"], use_cache=False, logits_to_keep=keep, **{self._cache_arg: record}).logits  # [C, |keep|, V]
        first = ctx_logits[torch.arange(ctx_logits.shape[0], device=keep.device), torch.searchsorted(keep, b["last"])]  # [C, V]
        if sorted(record.recorded) != list(range(self._layers)):
            raise RuntimeError(
                f"shared-context forward: the model recorded keys/values of layers {sorted(record.recorded)}, expected 0..{self._layers - 1} (set train.share_prefix_forward: false for this model)"
            )
        rows = b["row_unit"]
        extend = _PrefixCache.make([(record.recorded[i][0].index_select(0, rows), record.recorded[i][1].index_select(0, rows)) for i in range(self._layers)])  # [R, H, Lc, D] each
        attn = torch.cat([b["ctx_attn"].index_select(0, rows), b["attn"]], 1)  # [R, Lc + Ls]
        width = b["ids"].shape[1]
        logits = self.model(
            input_ids=b["ids"], attention_mask=attn, position_ids=b["positions"], use_cache=False, logits_to_keep=torch.arange(width - 1, device=self.device), **{self._cache_arg: extend}
        ).logits  # [R, Ls-1, V]
        if len(extend.layer_calls) != self._layers:
            raise RuntimeError(f"shared-context forward: {len(extend.layer_calls)} of {self._layers} layers read the context's keys/values (set train.share_prefix_forward: false for this model)")
        head = algos.token_logprobs(first.index_select(0, rows)[:, None], b["ids"][:, :1], self.temperature)  # [R, 1]: the first suffix token
        tail = algos.token_logprobs(logits, b["ids"][:, 1:], self.temperature, LOGPROB_CHUNK_TOKENS)  # [R, Ls-1]
        return torch.cat([head, tail], 1), b["old"], b["attn"].float()

    def _plain_logprobs(self, seqs: list[TrainSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs of each full sequence's trained positions [M, K-1] (one pass), old log-probs, mask."""
        ids, attn, targets, mask, old, keep = self._tensors(seqs)
        logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]  # [M, K-1, V]
        return algos.token_logprobs(logits, targets, self.temperature, LOGPROB_CHUNK_TOKENS), old, mask

    def _loss(self, micro: list[TrainSequence], logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, shared: bool) -> torch.Tensor:
        """Per-sequence losses [M]: each sequence's loss (its own `loss`, else the configured one)
        on its advantage, or on its token-level credits placed at its trained positions."""
        if all(s.token_advantages is None and not s.loss and not s.loss_kwargs for s in micro):  # the common case: one loss, one advantage per sequence
            return self.loss_fn(logp, old, torch.tensor([s.advantage for s in micro], device=logp.device), mask, **self.loss_kwargs)
        adv = torch.zeros_like(logp)  # [M, T]: credits in the log-probs' coordinates
        for i, s in enumerate(micro):
            start = 0 if shared else len(s.prompt_ids) + s.prefix_len - 1 - min(len(x.prompt_ids) + x.prefix_len - 1 for x in micro)
            n = len(s.response_ids) - s.prefix_len
            values = torch.tensor(s.token_advantages, dtype=logp.dtype) if s.token_advantages is not None else torch.full((n,), s.advantage, dtype=logp.dtype)
            adv[i, start : start + n] = values[: adv.shape[1] - start].to(logp.device)
        out = torch.zeros(len(micro), dtype=logp.dtype, device=logp.device)
        for name, kwargs in dict.fromkeys((s.loss, s.loss_kwargs) for s in micro):
            rows = torch.tensor([i for i, s in enumerate(micro) if (s.loss, s.loss_kwargs) == (name, kwargs)], device=logp.device)
            fn = algos.LOSSES[name] if name else self.loss_fn
            out = out.index_copy(0, rows, fn(logp[rows], old[rows], adv[rows], mask[rows], **{**self.loss_kwargs, **dict(kwargs)}))
        return out

    def update(self, seqs: list[TrainSequence], mini_batch_prompts: int, micro_batch_sequences: int, update_epochs: int = 1, micro_batch_tokens: int = 0) -> dict[str, float]:
        """One training step: mini-batches of prompts, one optimizer step each (AdamW steps on a
        mini-batch whose advantages are all zero too: its gradient is zero, momentum and weight
        decay still move the weights). Under a process group every process gets all `seqs` and
        trains on its share."""
        seqs, kl_metrics = self.reference_kl_advantages(seqs)
        self.model.train()
        prompts = sorted({s.prompt_index for s in seqs})
        minis = [set(prompts[i : i + mini_batch_prompts]) for i in range(0, len(prompts), mini_batch_prompts)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss over mini-batches, active tokens (on the device: no sync per micro-batch)
        counts = [0, 0]  # micro-batches, tokens forwarded (known on the host)
        norms, lr = [], self.optimizer.param_groups[0].get("initial_lr", self.optimizer.param_groups[0]["lr"])
        for _ in range(update_epochs):
            for mini in minis:
                batch = [s for s in seqs if s.prompt_index in mini]
                live = [s for s in batch if s.has_signal]  # A = 0 contributes no gradient
                self.optimizer.zero_grad(set_to_none=True)
                groups = shared_contexts(live) if self.share_prefix_forward else [[i] for i in range(len(live))]
                shared = any(len(g) > 1 for g in groups)  # the same on every process: all see all sequences
                plan = plan_micro_batches([len(s.prompt_ids) + len(s.response_ids) for s in live], self.world, micro_batch_sequences, micro_batch_tokens, groups)
                mine = plan[self.rank]
                for j, idx in enumerate(mine):
                    micro = [live[i] for i in idx] or [live[0]]  # an empty slot: zero-weight work
                    weight = self.world / len(batch) if idx else 0.0
                    if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP: reduce once, after the last
                        self.model.set_requires_gradient_sync(j == len(mine) - 1)
                    logp, old, mask = (self._shared_logprobs if shared else self._plain_logprobs)(micro)
                    loss = self._loss(micro, logp, old, mask, shared).sum() * weight
                    loss.backward()
                    real = 1.0 if idx else 0.0
                    sums += torch.stack([loss.detach().double() / self.world, mask.sum().double() * real])
                    if idx:
                        counts[0] += 1
                        counts[1] += forward_tokens(micro, shared)
                for p in params:  # a mini-batch without signal: a zero gradient, so AdamW still steps every weight
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                factor = algos.warmup_factor(self.optimizer_steps, self.warmup_steps)
                for group in self.optimizer.param_groups:  # initial_lr: the base rate, saved and restored with the optimizer
                    group.setdefault("initial_lr", group["lr"])
                    group["lr"] = lr = group["initial_lr"] * factor
                self.optimizer.step()
                self.optimizer_steps += 1
                norms.append(float(D.full(norm)))
        totals = torch.cat([sums, torch.tensor(counts, dtype=torch.float64, device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, tokens, micro_batches, forwarded = totals.tolist()
        self.model.eval()
        return {
            "learner/loss": loss_sum / max(len(minis) * update_epochs, 1),
            "learner/grad_norm": sum(norms) / len(norms) if norms else 0.0,
            "learner/optimizer_steps": float(len(norms)),
            "learner/active_tokens": tokens,
            "learner/micro_batches": micro_batches,
            "learner/forward_tokens": forwarded,
            "learner/sequences": float(len(seqs)),
            "learner/lr": lr,
            **kl_metrics,
        }

    @torch.no_grad()
    def reference_logprobs(self, seqs: list[TrainSequence]) -> list[list[float]]:
        """Log-probs of each sequence's trained tokens under the reference policy: the base model
        with the LoRA adapter disabled (peft's `disable_adapter()`, no second copy of the model),
        at the rollout temperature. Under FSDP every process runs the same forwards (all see all
        sequences)."""
        if not seqs:
            return []
        self.model.eval()
        out: list[list[float]] = []
        with self.model.disable_adapter():
            for i in range(0, len(seqs), REFERENCE_MICRO_SEQUENCES):
                micro = seqs[i : i + REFERENCE_MICRO_SEQUENCES]
                logp, _, mask = self._plain_logprobs(micro)  # [M, K-1]
                for row, s in enumerate(micro):
                    start = len(s.prompt_ids) + s.prefix_len - 1 - min(len(x.prompt_ids) + x.prefix_len - 1 for x in micro)
                    out.append(logp[row, start : start + len(s.response_ids) - s.prefix_len].float().cpu().tolist())
        return out

    def reference_kl_advantages(self, seqs: list[TrainSequence]) -> tuple[list[TrainSequence], dict[str, float]]:
        """SCoRe's KL to the reference, subtracted from the reward (hence from its advantage: SCoRe
        has no baseline): A_i <- A_i - kl_coef_i * (1/T_i) sum_t (log pi_old - log pi_ref), over
        the sequences with kl_coef > 0 (the others unchanged). Returns the sequences and
        `learner/kl_ref_mean` (the mean per-token estimate) when any was penalised."""
        import dataclasses

        idx = [i for i, s in enumerate(seqs) if s.kl_coef > 0]
        if not idx:
            return seqs, {}
        ref = self.reference_logprobs([seqs[i] for i in idx])
        out, kls = list(seqs), []
        for i, r in zip(idx, ref):
            s = seqs[i]
            kl = sum(o - q for o, q in zip(s.old_logprobs, r)) / max(len(r), 1)
            kls.append(kl)
            out[i] = dataclasses.replace(s, advantage=s.advantage - s.kl_coef * kl)
        return out, {"learner/kl_ref_mean": sum(kls) / len(kls)}

    def save_adapter(self, path: str | Path) -> Path:
        """peft's adapter directory (rank 0 writes it; every process must call this under FSDP)."""
        path = Path(path)
        lora = {k: D.full(v).detach().cpu() for k, v in self.model.named_parameters() if v.requires_grad}
        if self.rank == 0:
            self.model.save_pretrained(str(path), state_dict=lora)
            config = path / "adapter_config.json"  # peft writes target_modules from a set: in PYTHONHASHSEED's order
            data = json.loads(config.read_text())
            if isinstance(data.get("target_modules"), list):  # sorted, so the adapter's hash is the same in every process
                data["target_modules"] = sorted(data["target_modules"])
                config.write_text(json.dumps(data, indent=2, sort_keys=True))
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
        for group in state["optimizer"]["param_groups"]:  # saved before the warmup existed: the rate was the base rate
            group.setdefault("initial_lr", group["lr"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.optimizer_steps = int(state["optimizer_steps"])

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k: D.full(v).detach().clone() for k, v in self.model.named_parameters() if "lora_" in k}

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: D.full(v).detach().clone() for k, v in self.model.named_parameters() if "lora_" not in k}


def learner_from_config(cfg, adapter_path: str | None = None) -> Learner:
    """The learner a config describes (model, LoRA, optimizer, loss, rollout temperature)."""
    from srpo_core.runtime import resolve_model_path

    return Learner(
        resolve_model_path(cfg.model.name_or_path),
        cfg.lora,
        cfg.optim,
        dtype=cfg.model.dtype,
        temperature=cfg.rollout.temperature,
        loss=cfg.loss.loss,
        loss_kwargs={"clip_eps": cfg.loss.clip_eps, "dual_clip": cfg.loss.dual_clip},
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        adapter_path=adapter_path,
        share_prefix_forward=cfg.train.share_prefix_forward,
    )


def forward_tokens(seqs: list[TrainSequence], shared: bool) -> int:
    """Tokens a micro-batch runs through the model, padding aside: every full sequence, or with
    shared contexts each distinct context once plus every suffix."""
    if not shared:
        return sum(len(s.prompt_ids) + len(s.response_ids) for s in seqs)
    return sum(len(c) for c in {s.context for s in seqs}) + sum(len(s.response_ids) - s.prefix_len for s in seqs)


def plan_micro_batches(lengths: list[int], world: int, max_sequences: int, max_tokens: int = 0, groups: list[list[int]] | None = None) -> list[list[list[int]]]:
    """Micro-batches of sequence indices for each of `world` processes, the same count for all
    (the short ones get empty slots). A micro-batch holds at most `max_sequences` sequences and,
    if `max_tokens` > 0, at most `max_tokens` padded tokens (size x longest; a longer single
    sequence goes alone). `groups` (sequences sharing a context, `shared_contexts`; default: each
    alone) stay together: a group is cut only where it alone exceeds a limit, into chunks as large as
    the limits allow. Units (chunks) are taken longest first, each appended to the current
    micro-batch when it fits there, else opening the next; micro-batches are dealt round-robin."""
    groups = groups if groups is not None else [[i] for i in range(len(lengths))]
    units: list[list[int]] = []
    for group in groups:
        members = sorted(group, key=lambda i: (-lengths[i], i))
        cap = max_sequences if max_tokens <= 0 else max(1, min(max_sequences, max_tokens // max(lengths[members[0]], 1)))
        units += [members[k : k + cap] for k in range(0, len(members), cap)]
    units.sort(key=lambda u: (-lengths[u[0]], u[0]))
    micros: list[list[int]] = []
    for unit in units:
        cur = micros[-1] if micros else None
        size = len(cur) + len(unit) if cur is not None else 0
        if cur is not None and size <= max_sequences and (max_tokens <= 0 or lengths[cur[0]] * size <= max_tokens):
            cur.extend(unit)
        else:
            micros.append(list(unit))
    per_rank = -(-len(micros) // world) if micros else 0
    plan = [micros[r::world] for r in range(world)]
    return [p + [[] for _ in range(per_rank - len(p))] for p in plan]


def last_hidden_states(learner: Learner, seqs: list[TrainSequence], micro_batch_sequences: int) -> list[torch.Tensor]:
    """Features of a critic (srpo_core/critic.py): the policy's last hidden state at each boundary
    of each sequence's response, without gradient, float32 on the CPU. The boundary t = 0..T (after
    the prompt and t response tokens) is the hidden state of position len(prompt) + t - 1, which
    has seen exactly those tokens. -> [T_i + 1, width] per sequence. Under FSDP every process runs
    the same forwards (all of `seqs`)."""
    was_training = learner.model.training
    learner.model.eval()
    pad = learner.tokenizer.pad_token_id
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(seqs), max(micro_batch_sequences, 1)):
            chunk = seqs[i : i + max(micro_batch_sequences, 1)]
            width = max(len(s.prompt_ids) + len(s.response_ids) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                full = s.prompt_ids + s.response_ids
                ids[r, : len(full)] = torch.tensor(full)
                attn[r, : len(full)] = 1
            out_ = learner.model(input_ids=ids.to(learner.device), attention_mask=attn.to(learner.device), output_hidden_states=True, use_cache=False, logits_to_keep=1)
            hidden = out_.hidden_states[-1]  # [M, L, width]
            for r, s in enumerate(chunk):
                p = len(s.prompt_ids)
                out.append(hidden[r, p - 1 : p + len(s.response_ids)].float().cpu())
    if was_training:
        learner.model.train()
    return out
