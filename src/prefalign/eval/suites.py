"""Task suites: a YAML file names the data, the prompt template and the scorer; the model answers
greedily and each answer is scored exactly. Shipped: `arithmetic` (one step), `reasoning` (word problems
of 2-4 steps, eval/reasoning.py) and `safety` (in suites/); a user's own suite is any YAML file of the
same keys.

    name: arithmetic
    data: arithmetic.jsonl      # JSONL, relative to the YAML file
    prompt: "Question: {question}\\nAnswer:"   # fields of each item fill the template
    chat: auto                  # auto | true | false: through the tokenizer's chat template
    scorer: exact_number        # exact_match | exact_number | final_number | contains | refusal
    answer_field: answer        # the item field holding the right answer (not for refusal)
    max_new_tokens: 16

Scorers: `exact_match` (the answer's first line equals the expected text, case and space
normalised), `exact_number` (the first number in the answer equals the expected number),
`final_number` (the final answer of a worked solution, read by eval/reasoning.py's rule: the number
after the last "answer is", else the last number; it equals the expected number), `contains` (the
expected text occurs in the answer), `refusal` (items carry `expect: refuse|comply`; right when the
refusal rule set agrees; also reports `refusal_rate` on refuse items and `over_refusal_rate` on
comply items).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from ..config import ConfigError, StrictModel, explain, read_yaml, shown
from .reasoning import is_right
from .refusal import is_refusal

SHIPPED = Path(__file__).parent / "suites"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Suite(StrictModel):
    name: str
    data: str
    prompt: str
    chat: bool | Literal["auto"] = "auto"
    scorer: Literal["exact_match", "exact_number", "final_number", "contains", "refusal"]
    answer_field: str = "answer"
    max_new_tokens: int = 32
    limit: int | None = None  # the first N items only


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load_suite(name_or_file: str) -> tuple[Suite, list[dict]]:
    path = Path(name_or_file)
    if not path.suffix:
        path = SHIPPED / f"{name_or_file}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown suite {name_or_file!r}; shipped: {', '.join(shipped_suites())}, "
                              "or give a suite YAML file")
    try:
        suite = Suite.model_validate(read_yaml(path, "suite") or {})
    except ValidationError as e:
        raise ConfigError(explain(e, Suite, str(path))) from None
    data = (path.parent / suite.data) if not Path(suite.data).is_absolute() else Path(suite.data)
    try:
        lines = data.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:  # missing, a folder, not UTF-8, a NUL in the name
        raise ConfigError(f"{path}: data: {data}: cannot read it as UTF-8 text: {e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{data}:{n}: not JSON: {e}") from None
        if not isinstance(item, dict):
            raise ConfigError(f"{data}:{n}: expected a JSON object, got {type(item).__name__}")
        try:
            suite.prompt.format(**item)
        except KeyError as e:
            raise ConfigError(f"{data}:{n}: no field {e} for the prompt template") from None
        except (ValueError, IndexError, AttributeError) as e:  # '{', '{0}', '{a.b}' in the template
            raise ConfigError(f"{path}: prompt: not a template this item fills ({e}); fields are {{name}}, "
                              "a literal brace is {{ or }}") from None
        field = "expect" if suite.scorer == "refusal" else suite.answer_field
        if field not in item:
            raise ConfigError(f"{data}:{n}: {field}: missing")
        value = item[field]
        if suite.scorer in ("exact_number", "final_number") and not (
                isinstance(value, (str, int, float)) and NUMBER.fullmatch(str(value).strip())):
            raise ConfigError(f"{data}:{n}: {field}: {shown(value)} is not a number (scorer {suite.scorer})")
        items.append(item)
    return suite, items[:suite.limit] if suite.limit else items


def score_one(suite: Suite, item: dict, answer: str) -> bool:
    if suite.scorer == "refusal":
        return is_refusal(answer) == (item["expect"] == "refuse")
    expected = str(item[suite.answer_field])
    if suite.scorer == "exact_number":
        found = NUMBER.search(answer.replace(",", ""))
        return found is not None and float(found.group()) == float(expected)
    if suite.scorer == "final_number":
        return is_right(answer, expected)
    if suite.scorer == "contains":
        return expected.strip().lower() in answer.lower()
    first = answer.strip().split("\n", 1)[0] if answer.strip() else ""
    return " ".join(first.lower().split()) == " ".join(expected.lower().split())


def score_suite(suite: Suite, items: list[dict], answers: list[str]) -> dict:
    right = [score_one(suite, item, a) for item, a in zip(items, answers, strict=True)]
    out = {"score": sum(right) / len(right), "n": len(right)}
    if suite.scorer == "refusal":
        refused = [is_refusal(a) for a in answers]
        harmful = [r for r, i in zip(refused, items, strict=True) if i["expect"] == "refuse"]
        benign = [r for r, i in zip(refused, items, strict=True) if i["expect"] != "refuse"]
        out["refusal_rate"] = sum(harmful) / len(harmful) if harmful else float("nan")
        out["over_refusal_rate"] = sum(benign) / len(benign) if benign else float("nan")
    return out


def suite_prompts(suite: Suite, items: list[dict], tokenizer) -> list:
    """Each item's prompt: text, or a user message when the chat template is used."""
    use_chat = suite.chat is True or (suite.chat == "auto" and getattr(tokenizer, "chat_template", None))
    texts = [suite.prompt.format(**item) for item in items]
    return [[{"role": "user", "content": t}] for t in texts] if use_chat else texts
