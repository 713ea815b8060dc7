"""Multiple-choice, yes/no and fill-in verifiers on real items of the sample files."""

from __future__ import annotations

import pytest

from srpo_core.benchmarks import get_benchmark
from srpo_core.verifiers.choice import extract_choice, verify_choice, verify_filling, verify_yes_no


@pytest.fixture(scope="module")
def csqa_item():
    item = get_benchmark("commonsenseqa").load()[0]  # revolving door ... security measure: A) bank
    assert item.gold == "A" and item.labels == tuple("ABCDE")
    return item


@pytest.mark.parametrize(
    "response, correct",
    [
        ("Banks need security, so \\boxed{A}", True),
        ("\\boxed{\\text{(A)}}", True),
        ("Malls are big. The answer is (D).", False),
        ("The answer is A", True),
        ("It has to be the bank, i.e. A.", True),
        ("I considered B and C but A is best", True),
        ("Option C) department store, so \\boxed{C}", False),
        ("I think \\boxed{Z} or maybe (B)", False),  # Z is not a label, falls through to B
    ],
)
def test_commonsenseqa_choice(csqa_item, response, correct):
    assert verify_choice(response, csqa_item.gold, csqa_item.labels).correct is correct


def test_choice_priority_boxed_over_text(csqa_item):
    assert extract_choice("The answer is (B). On reflection \\boxed{A}", csqa_item.labels) == "A"


def test_choice_restricted_to_labels():
    # mcq-2 items of SciKnowEval biology have labels A, B only.
    item = next(i for i in get_benchmark("sciknoweval_biology").load() if len(i.choices) == 2)
    assert extract_choice("C and D are wrong, A.", item.labels) == "A"
    assert extract_choice("Clearly C.", item.labels) is None
    verdict = verify_choice("nothing to pick", item.gold, item.labels)
    assert not verdict.correct and verdict.reason == "no_answer"


def test_sciknoweval_mcq4_item():
    item = get_benchmark("sciknoweval_biology").load()[0]  # GB1 fitness mutant: B (0.005)
    assert item.gold == "B"
    assert verify_choice("The fitness is low, \\boxed{B}", item.gold, item.labels).correct
    assert not verify_choice("\\boxed{D}", item.gold, item.labels).correct


def test_strategyqa_yes_no():
    item = get_benchmark("strategyqa").load()[0]  # Albany GA before Albany NY: false
    assert item.gold == "no"
    assert verify_yes_no("Albany, GA is smaller, so no.", item.gold).correct
    assert verify_yes_no("Yes it grows, but no: \\boxed{No}", item.gold).correct
    assert not verify_yes_no("\\boxed{yes}", item.gold).correct
    assert not verify_yes_no("Yes.", item.gold).correct
    assert verify_yes_no("It cannot be known.", False).reason == "no_answer"
    with pytest.raises(ValueError):
        verify_yes_no("yes", "maybe")


def test_sciknoweval_true_or_false():
    item = next(i for i in get_benchmark("sciknoweval_biology").load() if i.answer_type == "yes_no")
    assert item.gold in ("yes", "no")
    other = "Yes" if item.gold == "no" else "No"
    assert verify_yes_no(f"\\boxed{{{item.gold.capitalize()}}}", item.gold).correct
    assert not verify_yes_no(f"\\boxed{{{other}}}", item.gold).correct


def test_sciknoweval_filling():
    item = get_benchmark("sciknoweval_chemistry").load()[0]
    assert item.gold == "Na2CrO4(aq) + 2LiBr(aq) = Li2CrO4(aq) + 2NaBr(s)"
    good = "\\boxed{\\ce{Na2CrO4(aq) + 2 LiBr(aq) -> Li2CrO4(aq) + 2 NaBr(s)}}"
    assert verify_filling(good, item.gold).correct
    assert not verify_filling("Na2CrO4(aq) + LiBr(aq) = Li2CrO4(aq) + NaBr(s)", item.gold).correct
    # A wrong leading coefficient contains the gold as a substring: not accepted.
    assert not verify_filling("\\boxed{2Na2CrO4(aq) + 2LiBr(aq) = Li2CrO4(aq) + 2NaBr(s)}", item.gold).correct
    other = get_benchmark("sciknoweval_chemistry").load()[1]
    assert other.gold == "NH4 + NO2 = 2H2O + 2N"
    assert verify_filling("The balanced equation is NH4 + NO2 = 2H2O + 2N.", other.gold).correct
    assert not verify_filling("NH4 + NO2 = 2H2O + 2N2", other.gold).correct
