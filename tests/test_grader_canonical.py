"""Every canonical solution is labelled Correct at its dataset's default deadline, and the
sandbox sees only test inputs."""

from __future__ import annotations

import json
from collections import Counter


from evil_moe.env.datasets import default_timeout_s, load_problems
from evil_moe.env.grader import Grader
from evil_moe.env.judge import Judge


def assert_all_correct(problems, expected_count=None):
    """Every canonical solution is Correct at its dataset's default deadline, all workers busy."""
    if expected_count is not None:
        assert len(problems) == expected_count
    (dataset,) = {p.dataset for p in problems}
    responses = [f"```python\n{p.canonical_solution}\n```" for p in problems]
    with Grader(timeout_s=default_timeout_s(dataset)) as grader:
        verdicts = grader.grade_batch(problems, responses, progress=False)
    wrong = {v.problem_id: v.error for v in verdicts if v.label != "Correct"}
    assert not wrong, f"{len(wrong)} canonical solutions not Correct: {wrong}"
    assert all(v.reward == 3.5 and v.tests_passed == v.tests_total for v in verdicts)
    return verdicts


def test_easy_set_canonicals():
    problems = load_problems("easy", "train") + load_problems("easy", "test")
    assert_all_correct(problems)


def test_humaneval_canonicals():
    problems = load_problems("humaneval", "train") + load_problems("humaneval", "test")
    assert_all_correct(problems, 164)


def test_leetcode_test_canonicals(shared_data):
    problems = load_problems("leetcode", "test", data_dir=shared_data / "leetcode")
    verdicts = assert_all_correct(problems, 119)
    assert Counter(v.tests_total > 20 for v in verdicts) == {True: 119}


def test_expected_values_never_enter_the_sandbox(shared_data):
    """The calls sent to the sandbox hold inputs only: no expected output appears in them."""
    lc = load_problems("leetcode", "test", data_dir=shared_data / "leetcode")[0]
    roman = next(p for p in load_problems("easy", "train") + load_problems("easy", "test")
                 if p.entry_point == "to_roman")
    for p in (lc, roman):
        calls = json.dumps(Judge(p).plan.calls)
        for t in p.tests:
            expected = t.rsplit(" == ", 1)[1]
            assert expected not in calls, (p.id, expected)
        assert len(Judge(p).plan.calls) == len(p.tests)
