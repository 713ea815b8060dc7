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
