"""The interface of a training method (see srpo_core/methods/__init__.py for how to add one).

Phase functions take a shard.PhaseContext and mutate a shard.Shard; they must be deterministic
given the context's seeds (the flow may retry a phase) and keep every piece of state they pass on
in the Shard (the flow stores it between steps as JSON). The defaults do nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from srpo_core import rollouts as R

if TYPE_CHECKING:  # pragma: no cover
    from srpo_core.shard import PhaseContext, Shard


@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own (`method.options` must be empty)."""


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: the method with the `method.*` overrides that make it."""

    method: str
    split: str = "none"
    localizer: str = "none"

    def overrides(self) -> dict:
        if self.split == "none":
            return {"method.method": self.method, "method.localizer": ""}
        return {"method.method": self.method, "method.split": self.split, "method.localizer": self.localizer}

    @property
    def key(self) -> str:
        return self.method if self.split == "none" else f"{self.method}-{self.split}-{self.localizer}"


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    phases: ClassVar[frozenset[str]] = frozenset()  # step.PHASES that do work for this method
    model_phases: ClassVar[frozenset[str]] = frozenset()  # those of them that sample from the policy
    localizers: ClassVar[tuple[str, ...]] = ()  # allowed method.localizer values (first: the default)
    uses_split: ClassVar[bool] = False  # reads method.split
    losses: ClassVar[tuple[str, ...]] = ("pg", "clip")
    options_class: ClassVar[type] = NoOptions

    # ---- settings --------------------------------------------------------------------------------
    @property
    def default_localizer(self) -> str:
        return self.localizers[0] if self.localizers else "none"

    def validate(self, m) -> list[tuple[str, str]]:
        """Cross-field rules on a config.MethodConfig: a list of (dotted key, reason) violations."""
        return []

    def options(self, m):
        """`method.options` as this method's options dataclass (validated by config.py)."""
        return m.parsed_options

    def variants(self, splits: list[str], localizers: list[str]) -> list[Variant]:
        """The comparison rows of this method for the splits and localizers asked."""
        return [Variant(self.name)]

    def label(self, variant: Variant, several_splits: bool, several_localizers: bool) -> str:
        return variant.method.upper()

    def rollouts_per_prompt(self, cfg) -> int:
        """The rollouts per prompt and step that this method's config asks for: its share of the
        rollout budget in an equal-budget comparison (`srpo compare --budget equal`, which scales
        `train.prompts_per_step` so that prompts x this number is the same for every method).
        Default `method.rollouts_per_prompt`: GRPO's group, the reset splits' budget of 8 (base
        group + suffixes), SCoRe's attempts (pairs x 2), SPO-Tree's leaves, Critique-GRPO's G
        trained chains (its G refinements, of which one per prompt is trained, are not counted)."""
        return cfg.method.rollouts_per_prompt

    # ---- the step's phases -----------------------------------------------------------------------
    def generate(self, ctx: "PhaseContext", shard: "Shard") -> None: ...

    def verify(self, ctx: "PhaseContext", shard: "Shard") -> None: ...

    def localize(self, ctx: "PhaseContext", shard: "Shard") -> None: ...

    def suffix(self, ctx: "PhaseContext", shard: "Shard") -> None: ...

    def verify_suffix(self, ctx: "PhaseContext", shard: "Shard") -> None:
        """Build the shard's rollout records (`shard.records`, R.Record as dicts)."""

    def extra_evaluation(self, engine, task, items, cfg) -> dict[str, float]:
        """Evaluation values beyond the greedy accuracy every method gets (logged by the
        comparison as eval/<benchmark>/<key>); SCoRe's second attempt, for example."""
        return {}

    # ---- learning --------------------------------------------------------------------------------
    def advantages(self, records: list[R.Record]) -> None:
        """Group-normalised advantages over each advantage group (seeds are not trained on)."""
        import torch

        from srpo_core.algos import group_advantages

        train = [r for r in records if r.trainable]
        if not train:
            return
        gids = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in train))}
        adv = group_advantages(torch.tensor([r.reward for r in train], dtype=torch.float64), torch.tensor([gids[r.group_id] for r in train]))
        for r, a in zip(train, adv.tolist()):
            r.advantage = a

    def train_sequences(self, records: list[R.Record]) -> list:
        """What the learner trains on: every trainable record, its prefix masked."""
        from srpo_core.learner import TrainSequence

        index = {pid: i for i, pid in enumerate(dict.fromkeys(r.item.id for r in records))}
        return [TrainSequence(r.rollout.prompt_ids, r.rollout.response_ids, r.rollout.prefix_len, r.advantage, r.rollout.logprobs, index[r.item.id]) for r in records if r.trainable]

    # ---- where the learner holds the model (credits from a critic; default: nothing) ------------
    def prepare_update(self, learner, cfg, seqs: list, parent_dir=None) -> tuple[list, dict[str, float]]:
        """Called by the learner step before `Learner.update` (plain loop: srpo_core/loop.py; flow:
        srpo_core/distributed.update_and_save, on every learner process), with the learner of the
        policy that sampled the step and, in the flow, the parent checkpoint's directory: the
        sequences to train on and the step's extra metrics."""
        return seqs, {}

    def save_update_state(self, learner, out_dir) -> None:
        """Write the method's learner-side state beside `out_dir/adapter` (the step checkpoint)."""

    def finish_records(self, records: list[R.Record], learner=None, checkpoint_dir=None) -> None:
        """Fill the records' fields that the update computed (from the in-memory learner, or the
        step checkpoint's directory when the update ran in other processes)."""


def records_to_shard(shard: "Shard", records: list[R.Record]) -> None:
    shard.records = [dataclasses.asdict(r) for r in records]
