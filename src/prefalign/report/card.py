"""A training run's model card: RUN/final/README.md in the Hugging Face Hub's format.

The YAML header is huggingface_hub's own ModelCardData, so the Hub reads it as it reads any card:
base_model (only a Hub id: a local folder is named in the body instead), library_name (peft for an
adapter, else transformers), pipeline_tag, tags (prefalign, the method, lora), datasets (Hub ids, when
the data came from the Hub) and license (only one read from the base model's own card; never guessed).
The body (report/card_body.py) is made of what the run folder records, nothing else:
  config.yaml       the method and its hyperparameters, the data files
  run.json          cost, hardware, the command that started the run
  data_stats.json   `prefalign data stats` of the data files, measured when the card is first written
                    (at the end of training, while the data is surely there) and kept for later cards
  eval.json         an evaluation of final/ (RUN/eval.json, RUN/eval/eval.json or --eval DIR)
A part whose file is missing says so, and which command makes it.

Written when a run ends by the command that ran it (cli/, tasks/: train/ may not import report/),
and again by `prefalign card RUN [--eval DIR]` after later evaluations.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..models.scalar import is_reward_model
from .card_body import body
from .card_sources import CARD, Sources, base_license, data_files, gather, hub_id


def write_card(run: str | Path, eval_dir: str | Path | None = None, output: str | Path | None = None,
               fresh_stats: bool = False) -> Path:
    """RUN/final/README.md (or OUTPUT) from the run folder; `fresh_stats` measures the data again
    rather than reading data_stats.json (the end of training does, for a run folder trained again)."""
    src = gather(Path(run), Path(eval_dir) if eval_dir is not None else None, fresh_stats)
    # ModelCard parses the header it is given: a header the Hub could not read fails here, not there
    card = ModelCard(f"---\n{metadata(src).to_yaml()}\n---\n\n{body(src)}")
    out = Path(output) if output is not None else src.final / CARD
    out.parent.mkdir(parents=True, exist_ok=True)
    card.save(out)
    return out


def metadata(src: Sources) -> ModelCardData:
    model = str(src.config.get("model", ""))
    adapter = src.adapter is not None
    datasets = [d for _, f in data_files(src.config, src.summary) if (d := hub_id(f, "datasets"))]
    return ModelCardData(
        base_model=hub_id(model), library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification" if is_reward_model(src.final) else "text-generation",
        tags=["prefalign", src.spec.name] + (["lora"] if adapter else []),
        datasets=list(dict.fromkeys(datasets)) or None, **base_license(model))
