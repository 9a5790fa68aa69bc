"""The `reasoning` suite: each shipped problem's answer recomputed from its own steps, the generator's
determinism, and the final-answer extraction rule on the cases it must get right."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from prefalign.eval import reasoning
from prefalign.eval.reasoning import final_number, is_right
from prefalign.eval.suites import SHIPPED, load_suite, score_suite

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def recompute(item: dict) -> int:
    """The answer from the item's own steps, with the arithmetic written out here."""
    value = item["steps"][0]["a"]
    for step in item["steps"]:
        assert step["a"] == value, item  # each step starts from the previous result
        b = step["b"]
        if step["op"] == "/":
            assert value % b == 0, item
            value = value // b
        else:
            value = OPS[step["op"]](value, b)
        assert step["result"] == value, item
        assert value >= 0
    return value


def test_every_shipped_answer_follows_from_its_steps():
    suite, items = load_suite("reasoning")
    assert suite.scorer == "final_number" and len(items) == 210
    assert {n: sum(i["n_steps"] == n for i in items) for n in (2, 3, 4)} == {2: 70, 3: 70, 4: 70}
    for item in items:
        assert 2 <= len(item["steps"]) <= 4 and len(item["steps"]) == item["n_steps"]
        assert int(item["answer"]) == recompute(item)
        # every number a step uses is in the question's text, in the order of the steps
        numbers = [int(x) for x in re.findall(r"\d+", item["question"])]
        used = [item["steps"][0]["a"]] + [s["b"] for s in item["steps"]]
        it = iter(numbers)
        assert all(any(n == u for n in it) for u in used), item["question"]
    assert len({i["question"] for i in items}) == len(items)


def test_the_generator_is_deterministic_and_the_shipped_file_is_its_output():
    assert reasoning.items(30, seed=3) == reasoning.items(30, seed=3)
    assert reasoning.items(30, seed=3) != reasoning.items(30, seed=4)
    assert [len(i["steps"]) for i in reasoning.items(6, seed=3)] == [2, 3, 4, 2, 3, 4]
    shipped = [json.loads(x) for x in (SHIPPED / "reasoning.jsonl").read_text().splitlines()]
    assert shipped == reasoning.items()  # regenerate with: python scripts/make_suites.py


@pytest.mark.parametrize("seed", range(5))
def test_generated_problems_of_each_length(seed):
    import random

    for n in (2, 3, 4):
        item = reasoning.problem(random.Random(seed), n)
        assert len(item["steps"]) == n and int(item["answer"]) == recompute(item)


@pytest.mark.parametrize(("text", "value"), [
    ("The answer is 42.", 42),
    ("The answer is 1,234.", 1234),                      # thousands separators
    ("1,234,567 in all", 1234567),
    ("it is 1,2345", 2345),                              # not a thousands group: 1 and 2345
    ("we counted 3,4,5", 5),                             # a list: its last number
    ("The answer is -7", -7),                            # negative
    ("so -12 apples", -12),
    ("from 3-5 days", 5),                                # a range, not a negative 5
    ("Total: 18!", 18),                                  # trailing punctuation
    ("18.", 18),
    ("(18)", 18),
    ("The answer is: $40.", 40),
    ("12 + 5 = 17, then 17 * 2 = 34", 34),               # several numbers: the last
    ("The answer is 9. Question: Ana has 3 apples", 9),  # the stated answer beats later numbers
    ("The answer is **24**, not 25.", 24),               # Markdown emphasis around the stated answer
    ("answer is 4, no wait, The Answer Is 6", 6),        # the last statement
    ("The answer is unknown, maybe 8", 8),               # a statement without a number: the last number
    ("The answer is 12.0", 12),                          # a whole number written with a decimal part
    ("The answer is 12.5", Decimal("12.5")),
    ("step2 of v1.5", None),                             # glued to letters or a dot: no number
    ("I do not know.", None),                            # no number
    ("", None),
])
def test_final_number(text, value):
    assert final_number(text) == value


def test_is_right_and_the_suite_score():
    assert is_right("so the answer is 24.", "24") and is_right("24.0", 24)
    assert not is_right("12.5", "12") and not is_right("no idea", "0") and not is_right("-24", "24")
    suite, items = load_suite("reasoning")
    first = items[:4]
    answers = [f"Step by step... The answer is {first[0]['answer']}.",      # right
               f"{int(first[1]['answer']) + 1}",                             # off by one
               f"I think {first[2]['answer']}, then 1000",                   # the last number is 1000
               f"{first[3]['answer']}"]                                      # right
    assert score_suite(suite, first, answers) == {"score": 0.5, "n": 4}


def test_a_final_number_suite_needs_numeric_answers(tmp_path):
    from prefalign.config import ConfigError

    (tmp_path / "q.jsonl").write_text('{"question": "q", "answer": "7"}\n{"question": "r", "answer": "seven"}\n')
    (tmp_path / "q.yaml").write_text("name: q\ndata: q.jsonl\nprompt: '{question}'\nscorer: final_number\n")
    with pytest.raises(ConfigError, match=r"q.jsonl:2: answer: 'seven' is not a number"):
        load_suite(str(tmp_path / "q.yaml"))
