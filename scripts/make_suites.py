"""Write the arithmetic and reasoning suites' data (deterministic): `python scripts/make_suites.py`.

Items are generated, so each answer is right by construction. arithmetic: two-operand sums,
differences and products of small numbers, and one-step word problems built from templates.
reasoning: word problems of 2-4 steps, from prefalign.eval.reasoning.items() (each item carries its
steps; tests/test_reasoning.py checks the shipped file is what this writes)."""

import json
import random
from pathlib import Path

SUITES = Path(__file__).resolve().parent.parent / "src" / "prefalign" / "eval" / "suites"
OUT = SUITES / "arithmetic.jsonl"
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
THINGS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells"]


def items(seed: int = 0):
    rng = random.Random(seed)
    for _ in range(100):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        yield {"question": f"What is {a} + {b}?", "answer": str(a + b), "kind": "add"}
    for _ in range(60):
        a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
        yield {"question": f"What is {a} - {b}?", "answer": str(a - b), "kind": "sub"}
    for _ in range(60):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        yield {"question": f"What is {a} times {b}?", "answer": str(a * b), "kind": "mul"}
    for _ in range(80):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if rng.random() < 0.5:
            q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            yield {"question": q, "answer": str(a + b), "kind": "word_add"}
        else:
            a, b = max(a, b), min(a, b)
            q = f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?"
            yield {"question": q, "answer": str(a - b), "kind": "word_sub"}


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} items -> {path}")


if __name__ == "__main__":
    from prefalign.eval import reasoning

    write(OUT, list(items()))
    write(SUITES / "reasoning.jsonl", reasoning.items())
