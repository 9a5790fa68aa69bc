"""Build the IMDb review prefixes the demo and the sentiment study use, from ../shared/data/imdb.

    python scripts/build_prefixes.py        # writes src/prefalign/assets/imdb_prefixes{,_validation}.jsonl

A prefix is the first 8 words of a cleaned IMDb *test* review (<br /> tags removed, whitespace
collapsed), taken in the order of the test reviews shuffled with seed+1, after the first 500 (which
scripts/build_base_model.py holds out for perplexity). This is how build_base_model.py made the
original 600 prefixes; two things are new:
- a review is skipped when its normalised text (tasks/sentiment.py `normalise`) also occurs in the
  train or unsup split (IMDb has cross-split duplicates, and the base model trained on those two
  splits) or earlier among the chosen reviews (within-test duplicates);
- a prefix is skipped when its normalised text equals a prefix already chosen (different reviews can
  open with the same words), so no prefix can land in two of train / validation / test.
The first 600 survivors are `imdb_prefixes.jsonl` (the test prefixes come first, then the train
prompts: tasks/sentiment.py `split_prefixes`); the next 256 are `imdb_prefixes_validation.jsonl`,
the prefixes on which settings are chosen.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

from prefalign.tasks.sentiment import normalise

ROOT = Path(__file__).resolve().parent.parent
IMDB = ROOT.parent / "shared" / "data" / "imdb"
ASSETS = ROOT / "src" / "prefalign" / "assets"
HELD_OUT_FOR_PERPLEXITY = 500  # build_base_model.py: test_texts[:500]
WORDS = 8


def reviews(name: str) -> list[str]:
    """One split's reviews, cleaned as the base model's training text was."""
    with gzip.open(IMDB / f"imdb_{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [" ".join(re.sub(r"<br\s*/?>", " ", json.loads(line)["text"]).split()) for line in f]


def shuffled_test(seed: int) -> list[str]:
    """The test reviews in build_base_model.py's order (its `test_texts`)."""
    texts = reviews("test")
    random.Random(seed + 1).shuffle(texts)
    return texts


def choose(candidates: list[str], seen_in_training: set[str], n: int) -> list[str]:
    """The first n prefixes whose review and prefix are both new (see the module docstring)."""
    reviews_taken, prefixes_taken, out = set(seen_in_training), set(), []
    for text in candidates:
        prefix = " ".join(text.split()[:WORDS])
        key_review, key_prefix = normalise(text), normalise(prefix)
        if key_review in reviews_taken or key_prefix in prefixes_taken or not key_prefix:
            continue
        reviews_taken.add(key_review)
        prefixes_taken.add(key_prefix)
        out.append(prefix)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} usable prefixes, {n} wanted")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", type=int, default=600, help="train + test pool")
    ap.add_argument("--validation", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="build_base_model.py's --seed")
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    write_prefixes(args.out, args.prefixes, args.validation, args.seed)


def write_prefixes(out: Path, n: int, n_validation: int, seed: int) -> None:
    seen = {normalise(t) for split in ("train", "unsup") for t in reviews(split)}
    test = shuffled_test(seed)
    chosen = choose(test[HELD_OUT_FOR_PERPLEXITY:], seen, n + n_validation)
    files = {"imdb_prefixes.jsonl": chosen[:n], "imdb_prefixes_validation.jsonl": chosen[n:]}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows), encoding="utf-8")
        print(f"{out / name}: {len(rows)} prefixes")


if __name__ == "__main__":
    main()
