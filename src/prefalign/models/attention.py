"""The row layouts (shared-prompt and packed rows) under each attention implementation.

A row-layout batch says who sees whom with two (B, T) vectors, `segment_ids` and `branch_ids`, read by
one rule (data/batches.py `attends`). Each implementation gets that rule in the form it takes:
- sdpa, eager: the dense (B, 1, T, T) mask, built from the vectors on the batch's device just before
  the forward (bool for sdpa; eager adds the mask to the scores, so 0 / dtype-min floats);
- flex_attention: a FlexAttention BlockMask built block by block from the vectors (`flex_block_mask`):
  no T x T tensor exists at any point, the kernel skips the key blocks no query of a block sees and
  evaluates `attends` only inside the blocks that are partly visible;
- flash_attention_2: packed rows laid end to end as one row whose position ids restart at 0 at every
  sequence; transformers then runs FlashAttention's varlen kernel over each sequence, with no mask at
  all. A shared-prompt row has no varlen form (the rejected answer's context skips the chosen answer
  in the middle of the row), so that layout is refused there (`shared_prompt_problem`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # FlexAttention exists from torch 2.5; the floor is 2.2, where load.attn_problem refuses flex_attention
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:
    BlockMask = None

from ..data.batches import attends, dense_row_mask
from ..errors import ConfigError
from .load import trunk_of, unwrap

# FlexAttention's sparse block (torch's _DEFAULT_SPARSE_BLOCK_SIZE): the tile its kernels skip or mask
FLEX_BLOCK = 128


def attn_implementation_of(model) -> str:
    """The attention implementation the loaded model runs ("sdpa", "eager", "flex_attention", ...)."""
    return getattr(unwrap(model).config, "_attn_implementation", None) or "eager"


def shared_prompt_problem(model) -> str | None:
    """Why the shared-prompt layout cannot run under this model's attention (None if it can)."""
    if attn_implementation_of(model) == "flash_attention_2":
        return ("flash_attention_2 takes no mask, and a shared-prompt row needs one (the rejected answer must "
                "not see the chosen one); packing works with it (varlen), or use sdpa / flex_attention")
    return None


def _visible_blocks(seg: Tensor, branch: Tensor) -> tuple[Tensor, Tensor]:
    """(B, n, block) ids -> (B, n, n) bools per (query block, key block): `partial`, some query may see
    some key (a superset is safe: `attends` still masks inside), and `full`, every query sees every key.

    Needs each segment to be one contiguous run of its row (both layouts lay them so). Runs are numbered
    in row order, so a key block before the query block shares a segment with it only if the key
    block's last real run is the query block's first: O(n^2) per row, never O(T^2)."""
    b, n, block = seg.shape
    flat = seg.reshape(b, -1)
    run = torch.cat([flat.new_zeros(b, 1), (flat[:, 1:] != flat[:, :-1]).long()], 1).cumsum(1).view(b, n, block)
    real = seg >= 0
    first = torch.where(real, run, n * block + 1).amin(-1)  # (B, n): first real run of each block
    last = torch.where(real, run, -1).amax(-1)  # (B, n): its last
    below = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril(-1)  # key block before the query block
    diagonal = torch.eye(n, dtype=torch.bool, device=seg.device)  # causal inside; padding sees itself there
    partial = diagonal | (below & (last[:, None, :] == first[:, :, None]))
    whole = (first == last) & real.all(-1)  # the block is one segment, no padding
    lo, hi = branch.amin(-1), branch.amax(-1)
    one = lo == hi
    # keys all on the trunk (branch 0), or keys and queries all on one branch: every query sees every key
    seen = (hi == 0)[:, None, :] | (one[:, None, :] & one[:, :, None] & (lo[:, None, :] == lo[:, :, None]))
    full = below & whole[:, :, None] & whole[:, None, :] & (first[:, :, None] == first[:, None, :]) & seen
    return partial & ~full, full


def _kv_lists(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, nq, nk) bool -> BlockMask's (B, 1, nq) counts and (B, 1, nq, nk) key-block indices, listed first."""
    counts = blocks.sum(-1).to(torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), order[:, None].contiguous()


def flex_block_mask(segment_ids: Tensor, branch_ids: Tensor, block: int = FLEX_BLOCK):
    """A FlexAttention BlockMask for a row-layout batch, from its (B, T) vectors alone. torch's
    create_block_mask would evaluate the mask_mod at all T x T points (eagerly: a dense mask) to find
    the blocks; the layouts' segments are contiguous runs, so the blocks follow from per-block summaries."""
    b, t = segment_ids.shape
    n = -(-t // block)
    # the kernels tile whole blocks, so mask_mod is asked about indices up to n * block: padding there
    seg = F.pad(segment_ids, (0, n * block - t), value=-1)
    branch = F.pad(branch_ids, (0, n * block - t))
    partial, full = _visible_blocks(seg.view(b, n, block), branch.view(b, n, block))

    def mask_mod(bi, h, q, k):
        return attends(seg[bi, q], branch[bi, q], seg[bi, k], branch[bi, k], q, k)

    return BlockMask.from_kv_blocks(*_kv_lists(partial), *_kv_lists(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(t, t))


def row_attention_mask(model, batch: dict[str, Tensor]):
    """What the model's attention takes for a row-layout batch: a BlockMask (flex_attention), or the
    dense (B, 1, T, T) mask (sdpa: bool; eager: additive floats in the model's dtype)."""
    seg, branch = batch["segment_ids"], batch["branch_ids"]
    implementation = attn_implementation_of(model)
    if implementation == "flex_attention":
        return flex_block_mask(seg, branch)
    mask = dense_row_mask(seg, branch)
    if implementation == "eager":  # eager adds the mask to the scores
        dtype = unwrap(model).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def varlen_row(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Packed rows end to end as one (1, R*W) row of input and position ids. transformers reads a batch
    of one row whose position ids restart at 0 as packed sequences, and FlashAttention's varlen
    kernel attends within each (padding columns, all at position 0, become one-token sequences)."""
    if bool((batch["branch_ids"] != 0).any()):
        raise ConfigError("attn_implementation: flash_attention_2 cannot run shared-prompt rows (no mask); "
                          "use share_prompt: false, or sdpa / flex_attention")
    return batch["input_ids"].reshape(1, -1), batch["position_ids"].reshape(1, -1)


def row_hidden_states(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, T, H) trunk states of a row-layout batch, under the model's own attention implementation."""
    trunk = trunk_of(model)
    ids, pos = batch["input_ids"], batch["position_ids"]
    if attn_implementation_of(model) == "flash_attention_2":
        flat_ids, flat_pos = varlen_row(batch)
        return trunk(input_ids=flat_ids, position_ids=flat_pos).last_hidden_state.view(*ids.shape, -1)
    return trunk(input_ids=ids, attention_mask=row_attention_mask(model, batch), position_ids=pos).last_hidden_state
