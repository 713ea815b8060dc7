"""Build the embedded models (`builtin:tiny-arith`, `builtin:tiny-arith-long`) from a config, reproducibly.

`build_tiny(cfg, out_dir)` builds the character tokenizer, a `LlamaForCausalLM` from scratch, and
supervised-trains it on the synthetic task (rollout traces plus localization answers) until greedy
pass@1 on held-out problems enters the target window, then saves a normal Hugging Face directory
(`save_pretrained` model, tokenizer, generation config) with a `build_info.json`.

`ensure_tiny()` returns the shipped checkpoint when its config hash matches, else builds once into
a cache directory; `resolve_model_path("builtin:tiny-arith")` is how the rest of the code gets it.

`BUILTINS` names the shipped configs. `tiny-arith-long` (the fidelity preset's model) is built by the
same code on the long-chain task (`synthetic.LONG_CHAINS`: 10-16 operations, one or two `*` steps),
starting from `tiny-arith`'s weights (`init_from`), with label noise on a few `*` facts
(`confused_facts`, `noise`): its traces write a fixed wrong result for those facts with probability
`noise` > 1/2, so its greedy chains get exactly those steps wrong and its samples get them right
1 - `noise` of the time: improvable states that are rare and spread along long chains.

Rebuild a shipped checkpoint with:  srpo build-tiny [--name tiny-arith-long]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAME = "tiny-arith"
# bump when the build code changes in a way that changes the weights for the same config
BUILD_VERSION = 1
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_DIR = ASSETS_DIR / BUILTIN_NAME


@dataclass(frozen=True)
class TinyModelConfig:
    # architecture (transformers Llama)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    # task (srpo_core.tasks.synthetic.ChainSpec) and prompt templates
    min_ops: int = 4
    max_ops: int = 8
    split_seed: int = 0
    n_train: int = 50000
    n_val: int = 200  # held-out train-split problems that drive the stop rule
    n_test: int = 200  # test-split problems for the reported pass@1 and localization agreement
    rollout_template: str = "tiny_rollout_v1"
    localization_template: str = "tiny_localization_v1"
    # phase 1, policy SFT on correct traces: AdamW, warmup then cosine over max_steps
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 64
    max_steps: int = 1500  # cosine horizon and hard cap
    min_steps: int = 100
    eval_interval: int = 25
    # stop at the first evaluation with val pass@1 >= stop_at; the build fails its target when
    # the final test pass@1 leaves [target_low, target_high]
    target_low: float = 0.15
    target_high: float = 0.60
    stop_at: float = 0.30
    # phase 2, localization SFT: the stopped policy samples (temperature 1) on onpolicy_prompts
    # train problems; its wrong samples, labelled by the oracle, are the on-policy localization
    # data, and all its samples are replayed as rollout targets so that the policy stays put
    onpolicy_prompts: int = 3000
    loc_steps: int = 120
    loc_lr: float = 1e-3
    loc_batch_size: int = 64
    loc_weight: float = 1.0
    onpolicy_frac: float = 0.9  # the rest: synthetic wrong chains (corrupt / copy_corrupt)
    copy_corrupt_frac: float = 0.5  # share of synthetic wrong chains that are copy slips
    anchor_batch_size: int = 32
    # determinism
    seed: int = 0
    num_threads: int = 2
    # added after build version 1: in the hash only when set off their defaults (see config_hash),
    # so that the checkpoints built before them keep their hash
    name: str = BUILTIN_NAME  # the builtin name (shipped under assets/NAME, cached under NAME/)
    init_from: str = ""  # a builtin to start from (its shipped or cached weights); "" = from scratch
    op_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # ChainSpec fields of the task
    error_prone_op: str = ""
    error_prone_steps: tuple[int, int] = (0, 0)
    # label noise: `confused_facts` facts `a <error_prone_op> b` (drawn from the seed, a result that
    # another operand would give) are written wrong with probability `noise` in the policy's traces
    confused_facts: int = 0
    noise: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "op_weights", tuple(self.op_weights))
        object.__setattr__(self, "error_prone_steps", tuple(self.error_prone_steps))
        _ = self.spec  # validates the task fields
        if self.confused_facts or self.noise:
            if not self.error_prone_op:
                raise ValueError("confused_facts/noise: need error_prone_op (the operation whose facts are confused)")
            if not (0 < self.noise < 1 and self.confused_facts > 0):
                raise ValueError(f"confused_facts/noise: need confused_facts > 0 and 0 < noise < 1, got {self.confused_facts}, {self.noise}")
        if self.init_from and self.init_from == self.name:
            raise ValueError(f"init_from: a model cannot start from itself ({self.name!r})")

    @property
    def spec(self):
        from srpo_core.tasks.synthetic import ChainSpec

        return ChainSpec(self.min_ops, self.max_ops, self.op_weights, self.error_prone_op, self.error_prone_steps)

    def smoke(self) -> "TinyModelConfig":
        """A few-step build that exercises every code path (for tests)."""
        return dataclasses.replace(
            self, n_train=256, n_val=8, n_test=8, max_steps=6, min_steps=0, warmup_steps=2, eval_interval=3,
            batch_size=8, onpolicy_prompts=8, loc_steps=3, loc_batch_size=4, anchor_batch_size=4,
        )


# fields added after build version 1 (see TinyModelConfig): hashed only off their defaults
_LATER_FIELDS = ("name", "init_from", "op_weights", "error_prone_op", "error_prone_steps", "confused_facts", "noise")


def config_hash(cfg: TinyModelConfig) -> str:
    fields = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(TinyModelConfig)}
    for key in _LATER_FIELDS:
        if fields[key] == defaults[key]:
            del fields[key]
    payload = json.dumps({"build_version": BUILD_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# the shipped builtins. tiny-arith-long: the fidelity regime (see the module docstring and README);
# its phase 1 continues tiny-arith on long chains until greedy pass@1 reaches stop_at
LONG_CONFIG = TinyModelConfig(
    name="tiny-arith-long", init_from=BUILTIN_NAME, min_ops=10, max_ops=16, error_prone_op="*", error_prone_steps=(1, 2),
    confused_facts=6, noise=0.65, n_test=500, lr=2e-3, warmup_steps=20, batch_size=32, max_steps=1400, min_steps=100,
    eval_interval=50, target_low=0.30, target_high=0.60, stop_at=0.40, onpolicy_prompts=1000, loc_steps=80,
    loc_batch_size=32, anchor_batch_size=16, num_threads=1,
)
BUILTINS: dict[str, TinyModelConfig] = {BUILTIN_NAME: TinyModelConfig(), LONG_CONFIG.name: LONG_CONFIG}


def shipped_dir(name: str = BUILTIN_NAME) -> Path:
    return ASSETS_DIR / name


def confusions(cfg: TinyModelConfig) -> dict[tuple[int, str, int], int]:
    """(a, op, b) -> the wrong result the noisy traces write for `a op b` (op: the error-prone one).

    The facts are drawn from the seed among those whose result another operand changes (not
    0*b or 5*b, which every unit maps to the same value); the wrong result is one that another
    valid operand gives (a 3-for-7 slip)."""
    from srpo_core.tasks.synthetic import ADD_SUB, MOD, MUL, apply

    if not cfg.confused_facts:
        return {}
    op = cfg.error_prone_op
    operands = MUL if op == "*" else ADD_SUB
    rng = random.Random(f"tiny-confusions-{cfg.seed}")
    candidates = []
    for a in range(MOD):
        for b in operands:
            wrong = sorted({apply(op, a, c) for c in operands if c != b} - {apply(op, a, b)})
            if wrong:
                candidates.append(((a, op, b), wrong))
    if cfg.confused_facts > len(candidates):
        raise ValueError(f"confused_facts: {cfg.confused_facts} asked, {op!r} has {len(candidates)} facts that can be confused")
    return {fact: rng.choice(wrong) for fact, wrong in rng.sample(candidates, cfg.confused_facts)}


# ----------------------------------------------------------------------------- build


def _seed_everything(cfg: TinyModelConfig) -> None:
    import torch

    torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    # CPU kernels are deterministic already; NaN-filling every torch.empty makes generate() 30x slower
    torch.utils.deterministic.fill_uninitialized_memory = False


def _make_model(cfg: TinyModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _lr_at(cfg: TinyModelConfig, step: int) -> float:
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _check_architecture(cfg: TinyModelConfig, model, init_dir: Path) -> None:
    c = model.config
    got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.max_position_embeddings)
    want = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.max_position_embeddings)
    if got != want:
        raise ValueError(f"init_from {cfg.init_from!r} ({init_dir}) has architecture {got}, the config asks {want}")


def _confused_hits(problems, responses: list[str], confused: dict[tuple[int, str, int], int]) -> dict[str, Any]:
    """How the greedy chains meet the confused facts: the share of problems whose correct chain
    reaches one, and, on those chains, how often the first one reached was written wrong."""
    from srpo_core.tasks import synthetic
    from srpo_core.tiny import sft

    reached = wrong_at_it = 0
    for p, text in zip(problems, responses):
        k = sft.first_confused_step(p, confused)
        if k is None:
            continue
        reached += 1
        thoughts = sft.split_thoughts(text)
        fe = synthetic.first_error(p, thoughts)
        wrong_at_it += fe == k
    return {"problems_reaching_one": reached / max(len(problems), 1), "first_error_there": wrong_at_it / max(reached, 1)}


def build_tiny(cfg: TinyModelConfig | None = None, out_dir: str | os.PathLike = SHIPPED_DIR, progress: bool = True) -> Path:
    """Train the tiny model for `cfg` and save it to `out_dir` (replaced if it exists)."""
    cfg = cfg or TinyModelConfig()
    t0, cpu0 = time.time(), time.process_time()
    init_dir = ensure_tiny(BUILTINS[cfg.init_from]) if cfg.init_from else None  # before the seeding below
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from srpo_core.tasks import synthetic
    from srpo_core.tiny import sft
    from srpo_core.tiny.tokenizer import build_tokenizer

    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    _seed_everything(cfg)
    try:
        tokenizer = build_tokenizer()
        if init_dir is not None:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
            _check_architecture(cfg, model, init_dir)
        else:
            model = _make_model(cfg, tokenizer)
        model.train()
        enc = sft.Encoder(tokenizer, cfg.rollout_template, cfg.localization_template)
        rng = random.Random(f"tiny-sft-{cfg.seed}")

        pool = synthetic.make_split("train", cfg.n_train + cfg.n_val, seed=cfg.split_seed, spec=cfg.spec)
        train, val = pool[: cfg.n_train], pool[cfg.n_train :]
        test = synthetic.make_split("test", cfg.n_test, seed=cfg.split_seed, spec=cfg.spec)
        confused = confusions(cfg)
        noise_rng = random.Random(f"tiny-noise-{cfg.seed}")  # its own stream: noise-free builds draw what they always drew

        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95),
        )

        def train_step(lr: float, losses: list[tuple[float, dict]]) -> list[float]:
            for group in opt.param_groups:
                group["lr"] = lr
            values = [sft.response_loss(model, batch) for _, batch in losses]
            total = sum(w * v for (w, _), v in zip(losses, values))
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            return [v.item() for v in values]

        # phase 1: the policy, on correct traces, until val pass@1 reaches stop_at
        rollout_cache: dict[str, sft.Example] = {}
        history: list[dict] = []
        snapshot = None  # (step, val pass@1, state dict) of the latest evaluation inside the window
        stopped_by_rule = False
        step = 0
        bar = tqdm(total=cfg.max_steps, desc="build-tiny policy", disable=not progress, dynamic_ncols=True)
        for step in range(1, cfg.max_steps + 1):
            examples = []
            for _ in range(cfg.batch_size):
                p = train[rng.randrange(len(train))]
                if confused and sft.has_confused_step(p, confused):
                    examples.append(enc.response(p, "".join(sft.noisy_thoughts(p, confused, cfg.noise, noise_rng))))
                    continue
                if p.question not in rollout_cache:
                    rollout_cache[p.question] = enc.rollout(p)
                examples.append(rollout_cache[p.question])
            (loss,) = train_step(_lr_at(cfg, step), [(1.0, enc.collate(examples))])
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                ev = sft.eval_rollouts(model, enc, val, cfg.max_ops)
                history.append({"phase": "policy", "step": step, "val_pass_at_1": ev.pass_at_1, "loss": round(loss, 4),
                                "seconds": round(time.time() - t0, 1)})
                bar.set_postfix(pass1=f"{ev.pass_at_1:.2f}", loss=f"{loss:.3f}")
                if cfg.target_low <= ev.pass_at_1 <= cfg.target_high:
                    snapshot = (step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                if step >= cfg.min_steps and ev.pass_at_1 >= cfg.stop_at:
                    stopped_by_rule = True
                    break
        bar.close()
        policy_steps = step
        if snapshot is not None and not (cfg.target_low <= history[-1]["val_pass_at_1"] <= cfg.target_high):
            # overshot the window between two evaluations: go back to the last one inside it
            policy_steps = snapshot[0]
            model.load_state_dict(snapshot[1])
            history.append({"phase": "policy", "restored_step": policy_steps})
        snapshot = None

        # phase 2: localization on the stopped policy's own sampled wrong chains (oracle labels)
        # and synthetic ones, while replaying the policy's own samples as rollout targets
        problems = rng.sample(train, min(cfg.onpolicy_prompts, len(train)))
        texts, finished = sft.generate(
            model, enc, [enc.rollout_prompt(p) for p in problems], sft.rollout_max_new_tokens(cfg.max_ops),
            sample=True, return_finished=True,
        )
        anchors = [enc.response(p, t, f) for p, t, f in zip(problems, texts, finished)]
        rewards = [synthetic.reward(p, t) for p, t in zip(problems, texts)]
        onpolicy = sft.wrong_chains(problems, texts, rewards)
        bar = tqdm(total=cfg.loc_steps, desc="build-tiny localizer", disable=not progress, dynamic_ncols=True)
        for loc_step in range(1, cfg.loc_steps + 1):
            loc_examples = []
            for _ in range(cfg.loc_batch_size):
                if onpolicy and rng.random() < cfg.onpolicy_frac:
                    p, thoughts, label = onpolicy[rng.randrange(len(onpolicy))]
                else:
                    p = train[rng.randrange(len(train))]
                    if rng.random() < cfg.copy_corrupt_frac:
                        thoughts, label = sft.copy_corrupt(p, rng)
                    else:
                        thoughts, label = synthetic.corrupt(p, rng)
                loc_examples.append(enc.localization(p, thoughts, label))
            batches = [(cfg.loc_weight, enc.collate(loc_examples))]
            if cfg.anchor_batch_size and anchors:
                batches.append((1.0, enc.collate([anchors[rng.randrange(len(anchors))] for _ in range(cfg.anchor_batch_size)])))
            progress_frac = (loc_step - 1) / max(cfg.loc_steps - 1, 1)
            lr = cfg.loc_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_frac)))
            losses = train_step(lr, batches)
            bar.update(1)
            bar.set_postfix(loc=f"{losses[0]:.3f}")
        bar.close()
        ev = sft.eval_rollouts(model, enc, val, cfg.max_ops)
        history.append({"phase": "localizer", "step": cfg.loc_steps, "val_pass_at_1": ev.pass_at_1,
                        "loss_localization": round(losses[0], 4) if cfg.loc_steps else None,
                        "onpolicy_chains": len(onpolicy), "onpolicy_sampled_pass_at_1": sum(rewards) / max(len(rewards), 1),
                        "seconds": round(time.time() - t0, 1)})

        # measurements on the test split: greedy pass@1, where greedy chains go wrong, and the
        # model's own localization of its own wrong chains (greedy and sampled) against the oracle
        ev_test = sft.eval_rollouts(model, enc, test, cfg.max_ops)
        greedy_wrong = sft.wrong_chains(test, ev_test.responses, ev_test.rewards)
        ev_sample = sft.eval_rollouts(model, enc, test, cfg.max_ops, sample=True)
        sampled_wrong = sft.wrong_chains(test, ev_sample.responses, ev_sample.rewards)
        loc_greedy = sft.eval_localization(model, enc, greedy_wrong)
        loc_sampled = sft.eval_localization(model, enc, sampled_wrong)
        synth_rng = random.Random(f"tiny-eval-{cfg.seed}")
        synth = [(p, *synthetic.corrupt(p, synth_rng)) for p in test]
        loc_synth = sft.eval_localization(model, enc, synth)

        confused_hits = _confused_hits(test, ev_test.responses, confused) if confused else None

        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors writes 0600; the cache may be shared
        info = {
            "name": cfg.name,
            "config": dataclasses.asdict(cfg),
            "config_hash": config_hash(cfg),
            "build_version": BUILD_VERSION,
            "seed": cfg.seed,
            "steps_trained": policy_steps + cfg.loc_steps,
            "policy_steps": policy_steps,
            "localizer_steps": cfg.loc_steps,
            "stopped_by_rule": stopped_by_rule,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "val_pass_at_1": history[-1]["val_pass_at_1"] if history else None,
            "pass_at_1": ev_test.pass_at_1,
            "pass_at_1_split": f"test[:{len(test)}]",
            "sampled_pass_at_1": ev_sample.pass_at_1,
            "greedy_first_error_histogram": sft.error_histogram(greedy_wrong),
            **({"init_from": cfg.init_from, "init_from_config_hash": config_hash(BUILTINS[cfg.init_from])} if cfg.init_from else {}),
            **({"confusions": {f"{a}{op}{b}": wrong for (a, op, b), wrong in sorted(confused.items())},
                "greedy_confused_steps": confused_hits} if confused else {}),
            "localization": {
                "greedy_wrong": dataclasses.asdict(loc_greedy),
                "sampled_wrong": dataclasses.asdict(loc_sampled),
                "synthetic_corrupt": dataclasses.asdict(loc_synth),
            },
            "history": history,
            "build_seconds": round(time.time() - t0, 1),
            "build_cpu_seconds": round(time.process_time() - cpu0, 1),  # all threads; wall time varies with load
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "num_threads": cfg.num_threads,
        }
        (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return out_dir
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
        torch.set_num_threads(threads_before)


# ----------------------------------------------------------------------------- cache


def _read_hash(path: Path) -> str | None:
    try:
        return json.loads((path / "build_info.json").read_text(encoding="utf-8")).get("config_hash")
    except (OSError, ValueError):
        return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("SRPO_CACHE_DIR") or Path.home() / ".cache" / "srpo")


def ensure_tiny(cfg: TinyModelConfig | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The shipped checkpoint when it was built from `cfg`, else a cached build (built once)."""
    cfg = cfg or TinyModelConfig()
    want = config_hash(cfg)
    shipped = shipped_dir(cfg.name)
    if _read_hash(shipped) == want and (shipped / "model.safetensors").exists():
        return shipped
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / cfg.name / want[:16]
    if _read_hash(target) == want:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}-", dir=root))
    try:
        build_tiny(cfg, tmp / "model")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a stale or partial build with another hash under our name
            shutil.rmtree(target)
        try:
            os.replace(tmp / "model", target)
        except OSError:
            if _read_hash(target) != want:  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:NAME` (a key of BUILTINS) -> a local checkpoint directory; anything else is returned unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise ValueError(f"unknown builtin model {name_or_path!r}; available: {', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}")
        return str(ensure_tiny(BUILTINS[name]))
    return name_or_path


# ----------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("build-tiny", help="build an embedded tiny model (builtin:tiny-arith by default) reproducibly")
    p.add_argument("--name", default=BUILTIN_NAME, choices=sorted(BUILTINS), help="which builtin to build")
    p.add_argument("--out", default=None, help="output directory (default: the shipped checkpoint; with --smoke, "
                   "$SRPO_CACHE_DIR/NAME-smoke)")
    p.add_argument("--seed", type=int, default=TinyModelConfig.seed)
    p.add_argument("--max-steps", type=int, default=None, help="cap on SFT steps (also the cosine horizon)")
    p.add_argument("--smoke", action="store_true", help="a few-step build to check the pipeline")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = dataclasses.replace(BUILTINS[args.name], seed=args.seed)
    if args.smoke:
        cfg = cfg.smoke()
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
    out_dir = args.out or (default_cache_dir() / f"{args.name}-smoke" if args.smoke else shipped_dir(args.name))
    out = build_tiny(cfg, out_dir, progress=not args.no_progress)
    info = json.loads((out / "build_info.json").read_text(encoding="utf-8"))
    loc = info["localization"]["greedy_wrong"]
    print(
        f"built {out} in {info['build_seconds']} s: {info['steps_trained']} steps, test pass@1 {info['pass_at_1']:.3f}, "
        f"localization on own greedy errors {loc['exact']:.3f} exact vs chance {loc['chance_exact']:.3f} (n={loc['n']})"
    )
    return 0
