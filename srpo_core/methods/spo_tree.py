"""SPO-Tree (Guo et al. 2025, "Segment Policy Optimization"), a table-3 baseline: a two-level tree
of samples per prompt, segment-level advantages from node values.

Tree `options.shape` = (K, M) (default (2, 4): 8 leaves, the budget of 8 trained rollouts):

    generate       K depth-1 segments per prompt: `options.segment_tokens` tokens sampled freely
                   (thought stops do not end them: engine.complete), or, with
                   `options.segment_thoughts` > 0, that many thoughts (thought boundaries, SRPO's
                   structure). A segment in which the chain already ended (an answer thought, an
                   end-of-sequence, a cap; the engine's chain-end rules) is a finished chain.
    suffix         M leaves from each open segment: one ThoughtRequest with the segment as a
                   token-exact prefix and n = M, so the segment is encoded once (the HF engine's KV
                   reuse; vLLM's prefix caching at scale); a finished segment's leaves are itself.
    verify_suffix  score the leaves; records: K segments (role `segment`, generated, trained
                   inside their leaves, reward = the node value) and K*M leaves (role `leaf`, the
                   full chain: the segment as prefix, trained too).

Values: leaf = its reward, segment = the mean of its leaves. Advantage of a node = its value
minus the mean value of its siblings, no std (algos.tree_advantages): segment tokens of a leaf
get their segment's (with K = 2: +-(V_a - V_b) / 2), the leaf's own tokens R - the mean of its
M siblings; token-level credits (TrainSequence.token_advantages). SPO's probability mask
(`options.prob_mask`, on): only tokens with pi_old < `options.prob_threshold` (0.9) are trained,
each leaf's loss a mean over its kept tokens (algos.probability_mask_credits). Loss: PPO clip.

A segment cut by token count may end inside a thought: the leaf's first thought then starts at
the segment's last thought boundary (the cut thought and its continuation are one thought), and
that thought may run past `rollout.max_thought_tokens` by the part in the segment.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from srpo_core import rollouts as R
from srpo_core.engine.base import Completion, Rollout, ThoughtLimits, ThoughtRequest
from srpo_core.methods import register
from srpo_core.methods.base import Method, Variant, records_to_shard
from srpo_core.methods.score import LossVariant, tiny_scale

BOXED = "\\boxed{"
SEGMENT_TOKENS = 600  # the authors' M
TINY_SEGMENT_TOKENS = 8
OPEN = "segment"  # finish_reason of a segment the leaves continue


@dataclass(frozen=True)
class SpoTreeOptions:
    shape: tuple[int, int] = (2, 4)  # (segments per prompt, leaves per segment)
    segment_tokens: int = 0  # depth-1 segment length in tokens (thought stops removed); 0: 600, or 8 with a tiny_ rollout template (tiny chains have ~40-60 tokens)
    segment_thoughts: int = 0  # > 0: cut segments after this many thoughts instead
    prob_mask: bool = True  # train only tokens with pi_old < prob_threshold, rescaled to a mean over them
    prob_threshold: float = 0.9

    def __post_init__(self):
        from srpo_core.config import ConfigError

        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ConfigError("method.options.shape: two positive integers (segments per prompt, leaves per segment); deeper trees are not implemented")
        if self.segment_tokens < 0:
            raise ConfigError("method.options.segment_tokens: must be >= 0 (0: the scale's default)")
        if self.segment_thoughts < 0:
            raise ConfigError("method.options.segment_thoughts: must be >= 0 (0: cut by segment_tokens)")
        if not 0 < self.prob_threshold <= 1:
            raise ConfigError("method.options.prob_threshold: must be in (0, 1]")


# ---- segments -----------------------------------------------------------------------------------


def _chain_end(text: str, n_thoughts: int, end: int, context: int, limits: ThoughtLimits) -> str | None:
    """engine.base's chain-end rules after a thought ending at response index `end`."""
    if BOXED in text:
        return "answer"
    if n_thoughts >= limits.max_thoughts:
        return "max_thoughts"
    if end + limits.max_thought_tokens > limits.max_response_tokens:
        return "max_response"
    if context + end + limits.max_thought_tokens > limits.max_model_len:
        return "max_model_len"
    return None


def segment_from_completion(engine, prompt_ids: list[int], comp: Completion, limits: ThoughtLimits) -> Rollout:
    """A free-running completion as a chain prefix: thoughts found at the stop string (or at
    max_thought_tokens, as the engine cuts them), the chain-end rules applied at each thought
    end (an ended chain is cut there, finished); otherwise open (finish `segment`), possibly
    ending inside a thought."""
    ids, stop = list(comp.ids), limits.stop
    stop_ids = engine.encode(stop)
    spans: list[tuple[int, int]] = []
    thoughts: list[str] = []
    start, finish, cut = 0, None, len(ids)
    for i in range(len(ids)):
        n = i + 1 - start
        if len(stop_ids) == 1:
            ends = ids[i] == stop_ids[0]
        else:
            ends = stop in engine.decode(ids[start : i + 1])
        if ends or n >= limits.max_thought_tokens:
            spans.append((start, i + 1))
            thoughts.append(engine.decode(ids[start : i + 1]))
            start = i + 1
            finish = _chain_end(thoughts[-1], len(spans), i + 1, len(prompt_ids), limits)
            if finish is not None:
                cut = i + 1
                break
    if finish is None and comp.finish_reason == "eos":
        finish = "eos"
        if start < len(ids):
            spans.append((start, len(ids)))
            thoughts.append(engine.decode(ids[start:]))
    ids = ids[:cut]
    return Rollout(list(prompt_ids), ids, 0, spans, list(comp.logprobs[:cut]), thoughts, engine.decode(ids), finish or OPEN, comp.adapter_version)


def join_cut_thought(engine, leaf: Rollout, segment: Rollout) -> Rollout:
    """A leaf continuing a segment cut inside a thought: the segment's tail after its last thought
    boundary and the leaf's first thought are one thought."""
    last = segment.spans[-1][1] if segment.spans else 0
    seg_len = len(segment.response_ids)
    if last >= seg_len:
        return leaf
    spans = [tuple(s) for s in leaf.spans]
    k = len(segment.spans)
    if len(spans) > k and spans[k][0] == seg_len:
        spans[k] = (last, spans[k][1])
    elif len(spans) == k:
        spans.append((last, len(leaf.response_ids)))
    thoughts = [engine.decode(leaf.response_ids[a:b]) for a, b in spans]
    return dataclasses.replace(leaf, spans=spans, thoughts=thoughts)


def finished_leaf(segment: Rollout) -> Rollout:
    """The leaf of a segment whose chain already ended: the chain itself, nothing sampled."""
    return dataclasses.replace(segment, prefix_len=len(segment.response_ids), logprobs=[], spans=list(segment.spans), thoughts=list(segment.thoughts))


def tree_of(records: list[R.Record]) -> dict[str, tuple[dict[int, R.Record], dict[tuple[int, int], R.Record]]]:
    """Per prompt id: its segment records by index and its leaf records by (segment, leaf)."""
    out: dict[str, tuple[dict, dict]] = {}
    for r in records:
        if r.role == "segment":
            out.setdefault(r.item.id, ({}, {}))[0][int(r.node)] = r
        elif r.role == "leaf":
            j, k = (int(x) for x in r.node.split("."))
            out.setdefault(r.item.id, ({}, {}))[1][(j, k)] = r
    return out


class SpoTree(Method):
    name = "spo_tree"
    description = "tree (2, 4): 2 segments of 600 tokens, 4 leaves each; sibling-mean segment advantages as token credits; pi_old < 0.9 mask"
    phases = frozenset({"generate", "suffix", "verify_suffix"})
    model_phases = frozenset({"generate", "suffix"})
    losses = ("clip",)
    localizers = ("random",)  # no resets; the value config.py requires of every method (as grpo)
    options_class = SpoTreeOptions
    trains_with_options = True  # step.train_sequences passes method.options

    def validate(self, m) -> list[tuple[str, str]]:
        k, n = m.parsed_options.shape
        return [] if k * n == m.rollouts_per_prompt else [("method.options.shape", f"{k} x {n} leaves != method.rollouts_per_prompt {m.rollouts_per_prompt}")]

    def variants(self, splits, localizers) -> list[Variant]:
        return [LossVariant(self.name, loss="clip")]

    def label(self, variant, several_splits, several_localizers) -> str:
        return "SPO-Tree"

    def generate(self, ctx, shard) -> None:
        opts = ctx.cfg.method.parsed_options
        k, limits = opts.shape[0], ctx.limits
        sampling = R.round_sampling(ctx.sampling("generate"), 0)
        if opts.segment_thoughts > 0:
            cap = dataclasses.replace(limits, max_thoughts=min(opts.segment_thoughts, limits.max_thoughts))
            out = ctx.policy.generate_thoughts([ThoughtRequest(tuple(s.prompt_ids), n=k) for s in shard.states], cap, sampling)
            open_at = opts.segment_thoughts < limits.max_thoughts
            segments = [[dataclasses.replace(r, finish_reason=OPEN) if open_at and r.finish_reason == "max_thoughts" else r for r in rs] for rs in out]
        else:
            length = opts.segment_tokens or (TINY_SEGMENT_TOKENS if tiny_scale(ctx.cfg) else SEGMENT_TOKENS)
            comps = ctx.policy.complete([list(s.prompt_ids) for s in shard.states for _ in range(k)], length, sampling)
            segments = [[segment_from_completion(ctx.policy, s.prompt_ids, c, limits) for c in comps[i * k : (i + 1) * k]] for i, s in enumerate(shard.states)]
        shard.extra["segments"] = [[dataclasses.asdict(r) for r in rs] for rs in segments]
        for s in shard.states:
            s.attempts = k
        shard.rounds = 1

    def _segments(self, shard) -> list[list[Rollout]]:
        from srpo_core.shard import rollout_from_dict

        return [[rollout_from_dict(d) for d in rs] for rs in shard.extra["segments"]]

    def suffix(self, ctx, shard) -> None:
        start = time.perf_counter()
        m = ctx.cfg.method.parsed_options.shape[1]
        segments = self._segments(shard)
        live = [seg for segs in segments for seg in segs if seg.finish_reason == OPEN]
        requests = [ThoughtRequest(tuple(seg.prompt_ids), n=m, prefix_ids=tuple(seg.response_ids), prefix_spans=tuple(tuple(s) for s in seg.spans)) for seg in live]
        out = iter(ctx.policy.generate_thoughts(requests, ctx.limits, ctx.sampling("suffix")) if requests else [])
        shard.suffixes = []
        for segs in segments:
            leaves: list[Rollout] = []
            for seg in segs:
                if seg.finish_reason == OPEN:
                    leaves += [join_cut_thought(ctx.policy, leaf, seg) for leaf in next(out)]
                else:
                    leaves += [finished_leaf(seg) for _ in range(m)]
            shard.suffixes.append(leaves)
        shard.timings["suffix"] = shard.timings.get("suffix", 0.0) + time.perf_counter() - start

    def verify_suffix(self, ctx, shard) -> None:
        import torch

        from srpo_core.algos import tree_values

        shape = ctx.cfg.method.parsed_options.shape
        records: list[R.Record] = []
        for state, segs, leaves in zip(shard.states, self._segments(shard), shard.suffixes):
            gid = f"{ctx.step}:{state.item.id}:base"
            scored = R.verify(ctx.task, state.item, leaves, shard.timings, ctx.cfg.rollout.score_unfinished)
            seg_values, _ = tree_values(torch.tensor([a.reward for a in scored], dtype=torch.float64), shape)
            for j, seg in enumerate(segs):
                records.append(R.Record(seg, state.item, "generated", f"{gid}:segments", float(seg_values[j]), role="segment", node=str(j), trained=False))
                for k in range(shape[1]):
                    a = scored[j * shape[1] + k]
                    records.append(R.Record(a.rollout, state.item, "base", gid, a.reward, role="leaf", node=f"{j}.{k}", trains_prefix=True))
        shard.suffixes = []
        records_to_shard(shard, R.mark_steps_valid(ctx.task, records))

    def advantages(self, records: list[R.Record]) -> None:
        """Node advantages (algos.tree_advantages) as each leaf's token credits: its segment's on
        the segment tokens, its own on the tokens it sampled."""
        import torch

        from srpo_core.algos import tree_advantages

        for pid, (segs, leaves) in tree_of(records).items():
            k, m = len(segs), len(leaves) // max(len(segs), 1)
            if sorted(leaves) != [(j, i) for j in range(k) for i in range(m)]:
                raise ValueError(f"spo_tree: prompt {pid!r} has leaves {sorted(leaves)} for {k} segments")
            seg_adv, leaf_adv = tree_advantages(torch.tensor([leaves[(j, i)].reward for j in range(k) for i in range(m)], dtype=torch.float64), (k, m))
            for j in range(k):
                segs[j].advantage = float(seg_adv[j])
                for i in range(m):
                    leaf = leaves[(j, i)]
                    leaf.advantage = float(leaf_adv[j * m + i])
                    leaf.token_advantages = [segs[j].advantage] * leaf.rollout.prefix_len + [leaf.advantage] * leaf.rollout.generated_tokens

    def train_sequences(self, records: list[R.Record], options: SpoTreeOptions | None = None) -> list:
        import torch

        from srpo_core.algos import probability_mask_credits
        from srpo_core.learner import TrainSequence

        opts = options or SpoTreeOptions()
        index = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
        out = []
        for pid, (segs, leaves) in tree_of(records).items():
            for (j, _), leaf in sorted(leaves.items()):
                old = list(segs[j].rollout.logprobs) + list(leaf.rollout.logprobs)  # the whole chain's sampling log-probs
                credits = torch.tensor(leaf.token_advantages if leaf.token_advantages is not None else [leaf.advantage] * len(old), dtype=torch.float64)[None]  # [1, T]
                if opts.prob_mask:
                    credits = probability_mask_credits(credits, torch.tensor(old, dtype=torch.float64)[None], torch.ones_like(credits), opts.prob_threshold)
                out.append(TrainSequence(leaf.rollout.prompt_ids, leaf.rollout.response_ids, 0, leaf.advantage, old, index[pid], token_advantages=tuple(credits[0].tolist())))
        return out


register(SpoTree())
