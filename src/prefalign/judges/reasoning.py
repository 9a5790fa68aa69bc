"""The `reasoning` suite: generated word problems that take 2-4 arithmetic steps, and the rule that
reads a model's final answer out of a worked solution.

Each item is built from its steps, so its answer is right by construction, and it carries them:

    {"question": "...", "answer": "19", "steps": [{"op": "*", "a": 6, "b": 4, "result": 24},
                                                  {"op": "-", "a": 24, "b": 5, "result": 19}], "n_steps": 2}

A step applies `op` (+ - * /) to the running quantity `a` and a number `b` from the text; `/` is
exact (the generator only divides what divides evenly). Every number is a whole number >= 0.
`scripts/make_suites.py` writes the shipped file from `items()`; tests/test_reasoning.py checks that
the file is what the generator writes and that every answer follows from its own steps.

Extraction (`final_number`): the model is asked to end with "The answer is N." and is scored by
exact match of the whole number read from its answer (suites scorer `final_number`):
  1. Numbers are written `-?D` where D is digits, optionally grouped in threes by commas
     ("1,234" is 1234; "1,2345" is 1 and 2345) and optionally followed by a decimal part ("12.0" is 12; "12.5" is never
     a whole number, so it is wrong). A number does not start right after a letter, digit, "_" or
     "." ("x2" and "v1.5" hold no number; "$12" and "(12)" do). A minus sign directly before the
     digits makes it negative unless it follows a letter or digit ("3-5" reads as 3 and 5).
     A trailing full stop, comma or other punctuation is not part of the number ("12." is 12).
  2. If the text says "answer is" (any case) followed by a number (optionally after ":", "$" or
     Markdown emphasis, "**24**" or "*24*"), the number after the LAST such phrase is the answer.
  3. Otherwise the LAST number anywhere in the text is the answer.
  4. No number: no answer (scored wrong).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

_NUM = r"-?(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?"
NUMBER = re.compile(rf"(?<![\w.])(?:{_NUM})")
ANSWER_IS = re.compile(rf"answer is\s*:?\s*\**\s*\$?\s*(?<![\w.])({_NUM})", re.IGNORECASE)


def _value(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def final_number(text: str) -> Decimal | None:
    """The final answer in `text` by the rule in the module docstring (None: no number)."""
    stated = ANSWER_IS.findall(text)
    if stated:
        return _value(stated[-1])
    found = NUMBER.findall(text)
    return _value(found[-1]) if found else None


def is_right(text: str, expected: str | int) -> bool:
    got = final_number(text)
    return got is not None and got == _value(str(expected))


# ------------------------------------------------------------------ the generator
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lina"]
THINGS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "stickers", "beads"]
CONTAINERS = ["boxes", "bags", "packs", "jars"]

# (op, sentence): {n} the person, {t} the things, {b} the step's number
STEP_TEXT = {
    "+": ["{n} buys {b} more {t}.", "A friend gives {n} {b} more {t}.", "{n} finds {b} more {t}."],
    "-": ["{n} gives away {b} {t}.", "{n} loses {b} of the {t}.", "{n} sells {b} {t}."],
    "*": ["{n} keeps collecting until there are {b} times as many {t} as before.",
          "By the end of the week {n} has {b} times as many {t} as before."],
    "/": ["{n} shares the {t} equally among {b} people, {n} included, and keeps one share.",
          "{n} splits the {t} into {b} equal piles and keeps one pile."],
}


def apply(op: str, a: int, b: int) -> int:
    if op == "/":
        if a % b:
            raise ValueError(f"{a} / {b} is not a whole number")
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _next_step(rng: random.Random, a: int) -> tuple[str, int]:
    """An operation on `a` that keeps every number a small whole number >= 0."""
    ops = ["+"]
    if a >= 3:
        ops.append("-")
    if a <= 150:
        ops.append("*")
    divisors = [d for d in (2, 3, 4, 5) if a % d == 0 and a // d >= 1]
    if divisors:
        ops.append("/")
    op = rng.choice(ops)
    b = {"+": lambda: rng.randint(2, 40), "-": lambda: rng.randint(1, a - 1) if a > 2 else 1,
         "*": lambda: rng.randint(2, 4), "/": lambda: rng.choice(divisors)}[op]()
    return op, b


def problem(rng: random.Random, n_steps: int) -> dict:
    """One word problem of exactly `n_steps` operations, with its steps and answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    steps: list[dict] = []
    if rng.random() < 0.4:  # the start is itself a step: containers of equal counts
        boxes, each = rng.randint(2, 9), rng.randint(2, 12)
        steps.append({"op": "*", "a": boxes, "b": each, "result": boxes * each})
        sentences = [f"{name} buys {boxes} {rng.choice(CONTAINERS)} with {each} {thing} in each."]
        a = boxes * each
    else:
        a = rng.randint(5, 60)
        sentences = [f"{name} has {a} {thing}."]
    while len(steps) < n_steps:
        op, b = _next_step(rng, a)
        result = apply(op, a, b)
        steps.append({"op": op, "a": a, "b": b, "result": result})
        sentences.append(rng.choice(STEP_TEXT[op]).format(n=name, t=thing, b=b))
        a = result
    question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    return {"question": question, "answer": str(a), "steps": steps, "n_steps": n_steps}


def items(n: int = 210, seed: int = 0) -> list[dict]:
    """`n` problems, 2, 3 and 4 steps in turn (deterministic for a seed)."""
    rng = random.Random(seed)
    return [problem(rng, 2 + i % 3) for i in range(n)]
