"""The synthetic task: generator, reward, and the step checker (oracle first wrong thought)."""

import random

from srpo_core.tasks import SyntheticTask, synthetic


def test_solution_chain_matches_spec_example():
    p = synthetic.Problem("x", "7*3-2-8+1", "2")
    assert synthetic.solution_thoughts(p) == ["7*3=1</thought>", "1-2=9</thought>", "9-8=1</thought>", "1+1=2</thought>", "\\boxed{2}</thought>"]
    assert synthetic.reward(p, "".join(synthetic.solution_thoughts(p))) == 1.0
    assert synthetic.first_error(p, synthetic.solution_thoughts(p)) is None


def test_first_error_finds_first_wrong_thought():
    p = synthetic.Problem("x", "7*3-2-8+1", "2")
    wrong = ["7*3=1</thought>", "1-2=8</thought>", "8-8=0</thought>", "0+1=1</thought>", "\\boxed{1}</thought>"]
    assert synthetic.first_error(p, wrong) == 2
    assert synthetic.first_error(p, ["7*3=1</thought>", "\\boxed{1}</thought>"]) == 2  # stopped early
    assert synthetic.first_error(p, []) == 1
    assert synthetic.first_error(p, synthetic.solution_thoughts(p) + ["extra</thought>"]) == 6


def test_corrupt_chains_have_known_first_error():
    rng = random.Random(0)
    for p in synthetic.make_split("train", 200, seed=1):
        thoughts, k = synthetic.corrupt(p, rng)
        assert synthetic.first_error(p, thoughts) == k


def test_wrong_step_can_still_reach_right_answer():
    # 5*7 = 5*9 = 5 (mod 10): the step checker and the outcome reward disagree, by design
    p = synthetic.Problem("x", "5*7", "5")
    chain = ["5*7=5</thought>", "\\boxed{5}</thought>"]
    assert synthetic.reward(p, "".join(chain)) == 1.0 and synthetic.first_error(p, chain) is None
    off = ["5*9=5</thought>", "\\boxed{5}</thought>"]
    assert synthetic.reward(p, "".join(off)) == 1.0 and synthetic.first_error(p, off) == 1


def test_splits_are_seeded_and_disjoint():
    task = SyntheticTask()
    train, test = task.items("train", 400, 0), task.items("test", 500, 0)
    assert {i.question for i in train}.isdisjoint({i.question for i in test})
    assert [i.question for i in train] == [i.question for i in task.items("train", 400, 0)]
    assert [i.question for i in train] != [i.question for i in task.items("train", 400, 1)]
    assert all(4 <= len(i.question) // 2 <= 8 for i in train)
    assert task.items("test", 50, 0) == test[:50]


def test_step_count_follows_the_items_the_dataset_has():
    """numinamath's local sample holds 76 train items, fewer than data.train_size: 9 steps of 8 per
    epoch, and the last step's cursor still names real items."""
    from srpo_core import data_order as epoch
    from srpo_core.config import load_config

    cfg = load_config("tiny", {"data.task": "numinamath_olympiads", "data.train_size": 1000, "train.prompts_per_step": 8, "train.mini_batch_prompts": 8, "train.epochs": 2})
    assert len(epoch.train_items(cfg)) == 76
    assert epoch.n_steps(cfg) == 18
    last = epoch.data_cursor(cfg, 17)
    assert (last["epoch"], last["index_in_epoch"]) == (1, 8) and len(last["item_ids"]) == 8


# ----------------------------------------------------------------------------- chain specs

# sha256 of the default task's first 50 test and 50 train items for seeds 0 and 42, as drawn before
# the chain spec existed (commit 42908ea): the default spec must keep every item of every run
DEFAULT_ITEMS_SHA256 = "ac53517a965ae6edcb73aec50c67bacdd950f4cebb8c12f22d99ebb5bda49d82"


def _items_digest(task) -> str:
    import hashlib

    rows = [f"{i.id}:{i.question}={i.gold}" for seed in (0, 42) for split in ("test", "train") for i in task.items(split, 50, seed)]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def test_default_spec_draws_the_items_it_always_drew():
    assert _items_digest(SyntheticTask()) == DEFAULT_ITEMS_SHA256
    # the config route with an empty section and an explicit default-valued one give the same items
    assert _items_digest(SyntheticTask.from_config({})) == DEFAULT_ITEMS_SHA256
    assert _items_digest(SyntheticTask.from_config({"min_ops": 4, "max_ops": 8, "op_weights": [2, 2, 2]})) == DEFAULT_ITEMS_SHA256


def _n_ops(question: str) -> int:
    return (len(question) - 1) // 2


def test_chain_length_range_is_what_the_spec_says():
    spec = synthetic.ChainSpec(min_ops=10, max_ops=16)
    problems = synthetic.make_split("test", 2000, seed=3, spec=spec)
    lengths = {_n_ops(p.question) for p in problems}
    assert lengths == set(range(10, 17))  # every length in range, and only those
    for p in problems[:200]:  # the gold answer is the correct chain's last value
        assert synthetic.solution_thoughts(p)[-1] == f"\\boxed{{{p.answer}}}</thought>"


def test_op_weights_set_the_operation_mix():
    spec = synthetic.ChainSpec(min_ops=8, max_ops=8, op_weights=(3.0, 1.0, 0.0))
    ops = [op for p in synthetic.make_split("test", 2000, seed=0, spec=spec) for op, _ in p.ops]
    share = ops.count("+") / len(ops)
    # 16000 draws of a 3/4 Bernoulli: standard error 0.0034, so +-0.02 is ~6 sigma
    assert abs(share - 0.75) < 0.02 and "*" not in ops


def test_error_prone_op_appears_exactly_the_set_number_of_times():
    spec = synthetic.LONG_CHAINS
    assert (spec.min_ops, spec.max_ops, spec.error_prone_op, spec.error_prone_steps) == (10, 16, "*", (1, 2))
    problems = SyntheticTask.long_chains().items("test", 2000, 0)
    counts = [i.question.count("*") for i in problems]
    assert set(counts) == {1, 2}
    # 2000 fair draws of {1, 2}: standard error 0.011 on the share, so +-0.05 is ~4.5 sigma
    assert abs(counts.count(2) / len(counts) - 0.5) < 0.05
    positions = [k for i in problems for k, (op, _) in enumerate(synthetic.Problem(i.id, i.question, i.gold).ops, 1) if op == "*"]
    assert min(positions) == 1 and max(positions) == 16  # placed anywhere along the chain
    assert all(10 <= _n_ops(i.question) <= 16 for i in problems)
    assert {i.question for i in problems}.isdisjoint({i.question for i in SyntheticTask.long_chains().items("train", 500, 0)})


def test_synthetic_long_is_a_registered_task():
    from srpo_core.tasks import get_task

    task = get_task("synthetic_long")
    assert task.name == "synthetic_long" and task.has_step_checker and task.spec == synthetic.LONG_CHAINS
    assert get_task("synthetic").spec == synthetic.DEFAULT_CHAINS


def test_bad_chain_specs_fail_naming_the_field():
    import pytest

    cases = [
        ({"min_ops": 0}, "min_ops"),
        ({"min_ops": 9}, "max_ops"),  # above the default max_ops 8
        ({"max_ops": 65}, "max_ops"),
        ({"min_ops": "4"}, "min_ops"),
        ({"op_weights": [1, 1]}, "op_weights"),
        ({"op_weights": [1, -1, 1]}, "op_weights"),
        ({"op_weights": [0, 0, 0]}, "op_weights"),
        ({"op_weights": 1}, "op_weights"),
        ({"error_prone_op": "/"}, "error_prone_op"),
        ({"error_prone_steps": [1, 2]}, "error_prone_steps"),  # without an error-prone op
        ({"error_prone_op": "*", "error_prone_steps": [0, 0]}, "error_prone_steps"),
        ({"error_prone_op": "*", "error_prone_steps": [2, 1]}, "error_prone_steps"),
        ({"error_prone_op": "*", "error_prone_steps": [5, 6]}, "error_prone_steps"),  # more than min_ops 4
        ({"error_prone_op": "*", "error_prone_steps": [1, 1], "op_weights": [0, 0, 1]}, "op_weights"),
        ({"min_op": 4}, "min_op"),
    ]
    for params, field in cases:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            synthetic.ChainSpec.from_mapping(params)


def test_data_synthetic_config_is_validated_with_its_dotted_key():
    import pytest

    from srpo_core.config import ConfigError, load_config

    cfg = load_config("tiny", {"data.synthetic": {"min_ops": 10, "max_ops": 16, "error_prone_op": "*", "error_prone_steps": [1, 2]}})
    assert SyntheticTask.from_config(cfg.data.synthetic).spec == synthetic.LONG_CHAINS
    with pytest.raises(ConfigError, match=r"data\.synthetic\.max_ops: an integer in \[min_ops=10"):
        load_config("tiny", {"data.synthetic": {"min_ops": 10}})
    with pytest.raises(ConfigError, match=r"data\.synthetic\.min_opz: unknown key"):
        load_config("tiny", {"data.synthetic": {"min_opz": 10}})
    with pytest.raises(ConfigError, match=r"data\.synthetic: sets the synthetic task's chains; data\.task is 'commonsenseqa'"):
        load_config("tiny", {"data.task": "commonsenseqa", "data.synthetic": {"min_ops": 2}})


def test_fidelity_preset_trains_and_evaluates_on_long_chains_with_the_long_model():
    from srpo_core.config import load_config
    from srpo_core.tasks import get_task
    from srpo_core.tiny import build as tb

    cfg = load_config("fidelity")
    assert cfg.model.name_or_path == "builtin:tiny-arith-long" and "tiny-arith-long" in tb.BUILTINS
    assert cfg.data.task == "synthetic_long" and tuple(cfg.eval.benchmarks) == ("synthetic_long",)
    # 500 items: a binomial standard error of at most 2.2 points, so a 5-point gain is >2 sigma
    assert cfg.eval.items_per_benchmark >= 500
    assert cfg.rollout.max_thoughts >= synthetic.LONG_CHAINS.max_ops + 1  # every operation plus the answer
    longest = max(get_task(cfg.data.task).items("test", 2000, cfg.data.data_seed), key=lambda i: len(i.question))
    assert len(longest.question) == 1 + 2 * synthetic.LONG_CHAINS.max_ops
    assert len(f">Q:{longest.question}|") <= cfg.rollout.max_prompt_tokens  # tiny_rollout_v1, one token per character


def test_data_synthetic_sets_the_chains_a_training_sees():
    """`data.synthetic` reaches the task of the training (its items) and of its evaluation."""
    import re

    from srpo_core import data_order
    from srpo_core.config import load_config

    cfg = load_config("tiny", {"data.synthetic": {"min_ops": 10, "max_ops": 12}})
    for items in (data_order.train_items(cfg), data_order.eval_task(cfg, "synthetic").items("test", 50, 0)):
        lengths = {len(re.findall(r"[-+*]", it.question)) for it in items}  # operations in "7-3-7+7*..."
        assert lengths and min(lengths) >= 10 and max(lengths) <= 12, lengths
    assert max(len(re.findall(r"[-+*]", it.question)) for it in data_order.train_items(load_config("tiny"))) <= 8  # the default: 4-8
