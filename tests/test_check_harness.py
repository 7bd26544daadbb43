"""The checks' harness: a check raises Failed or returns its ✓ message, and checker turns either, or a
learner's exception, into the Result a notebook prints."""

import pytest
import torch

from cyclelab.checks.harness import Failed, Result, call, checker, name_the_mistake, pair, tensor_answer


@checker
def check_double(fn) -> str:
    """A check written as the chapter modules write theirs: call, compare, raise Failed, return the ✓ line."""
    got = tensor_answer(fn, torch.tensor([1.0, 2.0]), noun="the doubled tensor", case="on [1, 2]")
    if not torch.equal(got, torch.tensor([2.0, 4.0], dtype=torch.float64)):
        raise Failed(f"on [1, 2]: expected [2, 4], got {got.tolist()}")
    return "correct: doubled"


def test_a_returned_message_is_a_pass_and_prints_a_tick():
    result = check_double(lambda x: x * 2)
    assert result == Result(True, "correct: doubled") and bool(result) and str(result) == "✓ correct: doubled"


def test_a_raised_failed_is_a_cross_with_its_hint():
    result = check_double(lambda x: x * 3)
    assert not result and str(result) == "✗ on [1, 2]: expected [2, 4], got [3.0, 6.0]"


def test_a_learner_exception_names_the_case_the_line_and_a_likely_cause():
    def broken(x):
        return x @ torch.ones(3, 3)

    message = check_double(broken).message
    assert message.startswith("on [1, 2]: your function raised RuntimeError: ")
    assert "(line " in message and "`return x @ torch.ones(3, 3)`" in message
    assert message.endswith("print the .shape of each side")


def test_a_changed_argument_is_reported_by_its_name():
    def in_place(values):
        values *= 2
        return values

    assert check_double(in_place).message.startswith("on [1, 2]: you changed `values` in place")


def test_wrong_kinds_of_answer_are_named():
    assert check_double(lambda x: (x * 2, x)).message == "return only the doubled tensor, not a tuple of 2"
    assert check_double(lambda x: [2.0, 4.0]).message == "return the doubled tensor as a tensor, not list"
    assert check_double(42).message == "pass your function itself, e.g. check_double(my_function), not a int"


def test_a_check_that_trips_on_the_answer_says_it_could_not_be_compared():
    @checker
    def check_len(fn) -> str:
        return f"length {len(call(fn))}"

    assert check_len(lambda: [1, 2]) == Result(True, "length 2")
    assert check_len(lambda: 5).message.startswith("your answer could not be compared (TypeError: ")


def test_pair_reads_two_numbers_or_fails_with_what_came_back():
    assert pair((3, torch.tensor(0.25))) == (3, 0.25)
    with pytest.raises(Failed, match=r"return a pair \(token_id, probability\), got 7"):
        pair(7)
    with pytest.raises(Failed, match=r"ONE number, got a tensor of shape \(2,\)"):
        pair((1, torch.tensor([0.5, 0.5])))


def test_name_the_mistake_raises_the_first_matching_hint_and_passes_otherwise() -> None:
    mistakes = {
        "doubled": torch.tensor([2.0, 4.0]),
        "negated": torch.tensor([-1.0, -2.0]),
        "also doubled": torch.tensor([2.0, 4.0]),
    }
    with pytest.raises(Failed, match=r"^doubled$"):
        name_the_mistake(torch.tensor([2.0, 4.0]), mistakes)
    with pytest.raises(Failed, match=r"^negated \(case 3\)$"):
        name_the_mistake(torch.tensor([-1.0, -2.0]), mistakes, case="case 3")
    assert name_the_mistake(torch.tensor([1.0, 2.0]), mistakes) is None  # no known mistake: the check goes on
    assert name_the_mistake(torch.tensor([2.0, 4.0, 0.0]), mistakes) is None  # another shape matches none
    with pytest.raises(Failed, match="off by one"):
        name_the_mistake(3, {"off by one": 4, "zero": 0}, same=lambda a, b: abs(a - b) == 1)
