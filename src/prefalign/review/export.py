"""`prefalign review export labels.sqlite -o pairs.jsonl`: the judgements as a preference file.

Each judged item gives one pair when its annotators' majority says one answer is better and at
least --min-agreement of them say so; every other judged item goes to the quarantine file with its
reason, one line each in the shape `prefalign data curate` writes (file, item, field, kind, problem,
raw): `tie`, `both_bad`, `disagreement` (no majority, or too small a one), `incomplete` (fewer than k
judgements; --incomplete keeps them). A written "better answer" is one annotator's own: it becomes
the chosen answer against each of the two shown answers, whatever the others said. Counts add up:
judged items == kept + set aside (by kind); unjudged items are counted, not written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..data import Text, norm, text_of
from ..errors import ConfigError, DataError
from .agreement import majority
from .store import Store
from .summary import summarise


def _as_record(prompt: Text, chosen: Text, rejected: Text) -> dict[str, Any]:
    """A plain-text pair, or a conversation when any part is a list of messages (a chat prompt with
    text answers becomes assistant turns), so the file is one shape `data check` reads."""
    if not any(isinstance(x, list) for x in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def turns(x: Text, role: str) -> list[dict[str, str]]:
        return x if isinstance(x, list) else [{"role": role, "content": x}]

    return {"prompt": turns(prompt, "user"), "chosen": turns(chosen, "assistant"),
            "rejected": turns(rejected, "assistant")}


def _same(a: Text, b: Text) -> bool:
    return norm(text_of(a)) == norm(text_of(b))


def _verdict_pair(item: dict[str, Any], per_item: int, min_agreement: float,
                  incomplete: bool) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """(the item's pair, None) or (None, (kind, reason))."""
    verdicts = [j["verdict"] for j in item["judgements"]]
    n = len(verdicts)
    top, share = majority(verdicts)
    if n < per_item and not incomplete:
        return None, ("incomplete", f"{n} of {per_item} judgements")
    if top is None:
        return None, ("disagreement", f"no majority: {dict(Counter(verdicts))}")
    if share < min_agreement:
        return None, ("disagreement", f"{share:.2f} of the annotators agree, under --min-agreement {min_agreement}")
    if top == "tie":
        return None, ("tie", f"judged a tie ({share:.2f} of the annotators)")
    if top == "both_bad":
        return None, ("both_bad", f"both answers judged bad ({share:.2f} of the annotators)")
    chosen, rejected = (item["first"], item["second"]) if top == "first" else (item["second"], item["first"])
    if _same(chosen, rejected):
        return None, ("tie", "the two answers are the same text")
    record = _as_record(item["prompt"], chosen, rejected)
    record.update({"agreement": share, "annotators": [j["annotator"] for j in item["judgements"]]})
    return record, None


def _written_pairs(item: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for j in item["judgements"]:
        better = j["better"].strip()
        if not better:
            continue
        for shown in (item["first"], item["second"]):
            if not _same(better, shown):  # a copy of a shown answer is no preference
                written = [{"role": "assistant", "content": better}] if isinstance(shown, list) else better
                out.append({**_as_record(item["prompt"], written, shown), "written_by": j["annotator"]})
    return out


def export(db: str | Path, out: str | Path, *, min_agreement: float = 0.0, incomplete: bool = False,
           quarantine: str | Path | None = None) -> dict[str, Any]:
    """Write the pairs, the quarantine and OUT's folder/review.json (the summary and these counts)."""
    db, out = Path(db), Path(out)
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no such review file")
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement is a share of annotators, within [0, 1]; got {min_agreement}")
    store = Store(db)
    meta = store.meta()
    if "source" not in meta:
        raise DataError(f"{db}: not a review file (no items were ever written to it)")
    items = store.items_with_judgements()
    quarantine = Path(quarantine or out.with_name(out.name.removesuffix(".jsonl") + ".quarantine.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    kept, written, set_aside, unjudged = 0, 0, Counter(), 0
    with open(out, "w", encoding="utf-8") as good, open(quarantine, "w", encoding="utf-8") as bad:
        for item in items:
            if not item["judgements"]:
                unjudged += 1
                continue
            record, reason = _verdict_pair(item, meta["per_item"], min_agreement, incomplete)
            source = f"{db.name}:item {item['id']}"
            if record is not None:
                kept += 1
                good.write(json.dumps({**record, "source": source}, ensure_ascii=False) + "\n")
            else:
                set_aside[reason[0]] += 1
                bad.write(json.dumps({"file": str(db), "item": item["id"], "field": "", "kind": reason[0],
                                      "problem": reason[1], "raw": item}, ensure_ascii=False) + "\n")
            for pair in _written_pairs(item):
                written += 1
                good.write(json.dumps({**pair, "source": source}, ensure_ascii=False) + "\n")
    summary = summarise(items, meta)
    summary["export"] = {"pairs": kept + written, "kept": kept, "written_answers": written,
                         "set_aside": dict(set_aside), "unjudged": unjudged, "min_agreement": min_agreement,
                         "output": str(out), "quarantine": str(quarantine)}
    (out.parent / "review.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
