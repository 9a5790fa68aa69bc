"""No pickle in a run folder: everything a training run leaves (checkpoints, the reference cache, final/,
metrics, the model card, TensorBoard's events) is in a closed list of formats that load without
executing anything: safetensors, JSON, JSONL, YAML, text, markdown, HTML, PNG and tfevents (protobuf)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import learnable_pairs, write_jsonl
from prefalign.api import train

ALLOWED = {".safetensors", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ".html", ".png", ".jinja"}
TFEVENTS = re.compile(r"^events\.out\.tfevents\.")  # TensorBoard's protobuf event files: no extension of their own


def not_allowed(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.is_file() and p.suffix not in ALLOWED and not TFEVENTS.match(p.name))


def test_a_run_folder_holds_only_safe_formats(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    common = dict(model=str(tiny_models["llama"]), data=str(data), max_steps=2, batch_size=4, save_every=2,
                  log=None, progress=False)
    # the model card (final/README.md, its figures) once: it is the same code for every method
    runs = {"dpo": dict(method="dpo", reference="precompute"),
            "dpo-lora": dict(method="dpo", reference="precompute", lora=True, card=False),
            "sft": dict(method="sft", card=False)}
    seen: set[str] = set()
    for name, fields in runs.items():
        run = tmp_path / name
        card = fields.pop("card", True)
        train({**fields, "output": str(run)}, card=card, **common)
        assert not_allowed(run) == [], name
        seen |= {"events" if TFEVENTS.match(p.name) else p.suffix for p in run.rglob("*") if p.is_file()}
    # the scan saw what it guards: checkpoints' state, the reference cache, final/'s weights, the events
    assert {".safetensors", ".json", ".jsonl", ".yaml", ".md", "events"} <= seen, seen
    assert (tmp_path / "dpo" / "checkpoints" / "step-2" / "state.safetensors").exists()
    assert (tmp_path / "dpo-lora" / "ref_logps.safetensors").exists()
    planted = tmp_path / "dpo" / "checkpoints" / "step-2" / "state.pt"
    planted.write_bytes(b"\x80\x04")  # a pickle's first bytes: the scan must see it
    assert not_allowed(tmp_path / "dpo") == ["checkpoints/step-2/state.pt"]
