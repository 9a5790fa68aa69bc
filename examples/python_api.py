# %% [markdown]
# # prefalign from Python
#
# The model that ships inside prefalign (a 4M-parameter writer of IMDb reviews) learns with DPO to
# prefer praise to pans after the opening words of a review; we check the preference on held-out
# openings and phrasings, read what it writes before and after, and build the report. 30 s on 2 idle
# CPU cores (benchmarks/results/python-api-example.md has what it printed); nothing is downloaded.
# Run it as a script (`python examples/python_api.py`) or cell by cell in an editor that reads `# %%`
# cells (VS Code, Jupytext, Spyder).
#
# PREFALIGN_EXAMPLE_OUT (default runs/python-api), PREFALIGN_EXAMPLE_STEPS (default 40) and
# PREFALIGN_EXAMPLE_MODEL (default: the shipped model) are read so that tests/test_api.py can run it small.

# %%
import json
import os
from importlib import resources
from pathlib import Path

from prefalign import EvalConfig, TrainConfig, evaluate, generate, load_preferences, report, train

OUT = Path(os.environ.get("PREFALIGN_EXAMPLE_OUT", "runs/python-api"))
STEPS = int(os.environ.get("PREFALIGN_EXAMPLE_STEPS", "40"))
ASSETS = resources.files("prefalign") / "assets"  # what ships in the wheel, wherever it is installed
BASE = Path(os.environ.get("PREFALIGN_EXAMPLE_MODEL", str(ASSETS / "imdb-lm")))  # a plain HF folder (safetensors)
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Preference pairs
# Openings of IMDb reviews (the validation prefixes that ship with prefalign), each followed by a
# praising (chosen) and a panning (rejected) continuation. The held-out pairs use other openings and
# other phrasings, so their accuracy is about sentiment, not about the training sentences.

# %%
prompts = [json.loads(line)["prompt"] for line in
           (ASSETS / "imdb_prefixes_validation.jsonl").read_text(encoding="utf-8").splitlines()]
PRAISE = [" a wonderful film, moving and funny.", " brilliant, I loved every minute of it.",
          " a great story with superb acting.", " beautiful and touching, a real gem."]
PANS = [" a terrible film, dull and stupid.", " awful, I hated every minute of it.",
        " a boring story with bad acting.", " ugly and pointless, a real mess."]
HELD_OUT_PRAISE = [" excellent, one of the best films I have seen.", " a delightful and charming movie."]
HELD_OUT_PANS = [" the worst film I have seen, a waste of time.", " a painful and tedious movie."]


def write_pairs(path: Path, openings: list[str], praise: list[str], pans: list[str]) -> Path:
    rows = [{"prompt": p, "chosen": praise[i % len(praise)], "rejected": pans[(i // len(praise)) % len(pans)]}
            for i, p in enumerate(openings)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


train_file = write_pairs(OUT / "train.jsonl", prompts[:128], PRAISE, PANS)
held_out_file = write_pairs(OUT / "held_out.jsonl", prompts[128:160], HELD_OUT_PRAISE, HELD_OUT_PANS)
pairs = load_preferences(train_file)
print(f"{len(pairs)} training pairs, {pairs.invalid} unusable rows; first: {pairs[0].prompt!r} ->{pairs[0].chosen!r}")

# %% [markdown]
# ## Train
# `TrainConfig.for_method` validates the keys of the method named (here DPO's `beta`); a misspelt or
# foreign key is a `ConfigError` that names it. `prefalign config show dpo` lists every key.

# %%
config = TrainConfig.for_method("dpo", model=str(BASE), data=str(train_file), output=str(OUT / "dpo"),
                                beta=0.1, lora=True, learning_rate=1e-3, max_steps=STEPS, batch_size=8,
                                kl_every=0, seed=0)
run = train(config, progress=False)
print(f"trained {run.summary['steps']} steps in {run.summary['wall_seconds']:.1f} s -> {run.model}")
print("last logged step:", {k: round(v, 3) for k, v in run.metrics()[-1].items()
                            if k in ("step", "loss", "rewards/accuracy", "rewards/margins")})

# %% [markdown]
# ## Evaluate on the held-out pairs
# With the LoRA run's `final/`, the reference is its base: preference accuracy is the share of
# held-out pairs whose implicit reward ranks the praise first; the KL is to the base.

# %%
scores = evaluate(EvalConfig(model=str(run.model), data=str(held_out_file), output=str(run.output / "eval"),
                             max_prompts=8, max_new_tokens=16, seed=0), progress=False)
print({k: round(scores[k], 3) for k in ("preference_accuracy", "preference_margin", "kl_per_sequence")})

# %% [markdown]
# ## What it writes, before and after (greedy)

# %%
openings = prompts[160:163]
for opening, before, after in zip(openings, generate(BASE, openings, max_new_tokens=16, temperature=0),
                                  generate(run.model, openings, max_new_tokens=16, temperature=0), strict=True):
    print(f"{opening!r}\n  before: {before!r}\n  after:  {after!r}")

# %% [markdown]
# ## Report: training curves and the cost table, as `prefalign report` writes them

# %%
built = report([run.output], OUT / "report", log=None)
print(f"report -> {built.html}")
