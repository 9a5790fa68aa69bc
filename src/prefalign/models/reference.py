"""The reference model, three ways. All give the same log-probs (tested to 1e-5):
- `precompute`: one pass over the data before training, cached on disk next to the run with a
  fingerprint of model weights + tokenized data + precision, so training holds one model and runs
  no reference forward. A stale cache (other model, data or tokenizer settings) is recomputed, and
  so is a corrupt one: the table's sha256 is stored beside the fingerprint, and a cache that does
  not open, or whose table does not match it (a bit flip, a truncated or empty file), is never used.
- `adapter`: with LoRA, the same model with adapters disabled (no second copy).
- `copy`: a frozen copy of the model.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .. import faults
from ..errors import ConfigError
from ..storage import commit, disk_full, tmp_name
from .load import is_peft, unwrap
from .logps import batch_logps


def _forward(model, batch: dict[str, Tensor], chunk_mb: float) -> Tensor:
    return batch_logps(model, batch, chunk_mb)


class AdapterReference:
    name = "adapter"

    def __init__(self, model, autocast: Callable = nullcontext, chunk_mb: float = 128.0):
        if not is_peft(model):
            raise ConfigError("reference: adapter needs LoRA (lora: true)")
        self.model, self.autocast, self.chunk_mb = model, autocast, chunk_mb

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor]) -> Tensor:
        with self.model.disable_adapter(), self.autocast():
            return _forward(self.model, batch, self.chunk_mb)


class CopyReference:
    name = "copy"

    def __init__(self, model, autocast: Callable = nullcontext, chunk_mb: float = 128.0):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False).eval()
        self.peft = is_peft(model)
        self.autocast, self.chunk_mb = autocast, chunk_mb

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor]) -> Tensor:
        # a copy taken before training; for a LoRA model the copy's adapters are switched off too
        ctx = self.model.disable_adapter() if self.peft else nullcontext()
        with ctx, self.autocast():
            return _forward(self.model, batch, self.chunk_mb)


class PrecomputedReference:
    name = "precompute"

    def __init__(self, table: Tensor):
        self.table = table  # (N, slots): log-probs of every sequence of every example

    def logps(self, batch: dict[str, Tensor]) -> Tensor:
        rows = self.table[batch["index"].cpu()]  # (B, slots); the table stays in host memory
        return rows.T.reshape(-1).to(batch["input_ids"].device)  # slot-major, as collate orders rows


def fingerprint(model, examples, extra: str = "") -> str:
    """Hash of the base weights (adapters excluded), every tokenized sequence, and settings."""
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    for ex in examples:
        for s in ex.seqs:
            h.update(len(s.input_ids).to_bytes(4, "little") + s.prompt_len.to_bytes(4, "little"))
            h.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
            if s.mask is not None:  # which tokens are scored, when not simply all after the prompt
                h.update(bytes(s.mask))
    return h.hexdigest()


def cache_sha256(fp: str, table: Tensor) -> str:
    """The cache's checksum: its fingerprint and its table's bytes, so a flip in either is caught."""
    return hashlib.sha256(fp.encode() + table.contiguous().numpy().tobytes()).hexdigest()


def read_cache(cache: Path, fp: str, log: Callable[[str], None] = print) -> Tensor | None:
    """The cached table when `cache` is whole (its sha256 matches) and this data's (fingerprint `fp`);
    else None, with what was wrong logged (nothing, when there is no cache yet)."""
    if not cache.exists():
        return None
    why = None
    try:
        with safe_open(str(cache), "pt") as f:
            meta, table = f.metadata() or {}, f.get_tensor("logps")
    except Exception as e:  # a truncated, empty or flipped header: safetensors' own error, whichever it is
        why = f"corrupt ({type(e).__name__}: {str(e)[:120]})"
    else:
        if "sha256" not in meta:
            why = "without a checksum (an older prefalign wrote it)"
        elif meta["sha256"] != cache_sha256(meta.get("fingerprint", ""), table):
            why = "corrupt (it does not match the sha256 written with it: a bit flip, or a write cut short)"
        elif meta.get("fingerprint") != fp:
            why = "stale (model, data or tokenizer settings changed)"
    if why is not None:
        log(f"reference log-probs: cache {cache.name} is {why}; recomputing")
        return None
    return table


def write_cache(cache: Path, table: Tensor, fp: str) -> None:
    """The table and its fingerprint and sha256, under a temporary name renamed once whole; a full disk
    is a StorageError naming the cache, the partial file removed."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(cache)
    with disk_full(cache, table.numel() * table.element_size(), tmp):
        save_file({"logps": table}, str(tmp), metadata={"fingerprint": fp, "sha256": cache_sha256(fp, table)})
        faults.point("reference.cache.write", tmp)
        commit(tmp, cache)


def precompute(model, batches: Iterator[dict[str, Tensor]], n_examples: int, slots: int, cache: Path,
               fp: str, autocast: Callable = nullcontext, chunk_mb: float = 128.0,
               log: Callable[[str], None] = print, gather: Callable[[Tensor], Tensor] | None = None,
               write: bool = True, agree: Callable[[bool], bool] = bool) -> PrecomputedReference:
    """The table of reference log-probs of every example. Several processes: each passes `batches`
    over its own share of the examples, `gather` sums the tables (zeros where another rank wrote),
    only the process told to `write` saves the cache, and the cache is used only if every process
    finds it fresh (`agree`), since otherwise some would wait in `gather` for the others."""
    table = read_cache(cache, fp, log)
    if agree(table is not None):
        log(f"reference log-probs: cached ({cache.name}, fingerprint {fp[:12]})")
        return PrecomputedReference(table)
    table, filled = torch.zeros(n_examples, slots), torch.zeros(n_examples)
    ctx = model.disable_adapter() if is_peft(model) else nullcontext()
    was_training = model.training
    model.eval()
    with torch.no_grad(), ctx, autocast():
        for batch in batches:
            faults.point("reference.precompute")
            b, index = len(batch["index"]), batch["index"].cpu()
            table[index] = _forward(model, batch, chunk_mb).float().cpu().view(slots, b).T
            filled[index] += 1
    model.train(was_training)
    if gather is not None:
        table, filled = gather(table), gather(filled)
    if not bool((filled == 1).all()):
        raise RuntimeError("reference precompute missed (or repeated) some examples")
    if write:
        write_cache(cache, table, fp)
    log(f"reference log-probs: computed for {n_examples} examples -> {cache.name}")
    return PrecomputedReference(table)
