"""Per-token log-probs of the labels, in fp32, without the batch's full-vocabulary log-softmax.

The trunk returns hidden states; only the positions that are scored (completion tokens) go
through the output head, in chunks of at most `chunk_mb` of fp32 logits. With gradients on, each
chunk is checkpointed: its logits are recomputed in backward instead of being kept, so the
memory held for logits is one chunk, whatever the vocabulary or the batch. log p(y) is computed as
logit[y] - logsumexp(logits) in fp32, so bf16 autocast never reaches the normaliser.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .load import backbone_and_head, unwrap


def _chunk_logps(hidden: Tensor, labels: Tensor, head: torch.nn.Module, softcap: float | None) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)


def token_logps(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, *,
                chunk_mb: float = 128.0) -> Tensor:
    """(B, T) log p(x_t | x_<t) at every scored position t (loss_mask[t] true), 0 elsewhere.

    loss_mask marks the tokens to score (completion tokens); position 0 can never be scored.
    """
    trunk, head = backbone_and_head(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    targets = loss_mask[:, 1:].bool()  # (B, T-1): is token t+1 scored
    rows, cols = targets.nonzero(as_tuple=True)
    h = hidden[:, :-1][rows, cols]  # (N, H): the states that predict the scored tokens
    y = input_ids[:, 1:][rows, cols]  # (N,)
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    vocab = head.weight.shape[0]
    step = max(1, int(chunk_mb * 2**20 // (4 * vocab)))
    pieces = []
    for start in range(0, h.shape[0], step):
        hs, ys = h[start:start + step], y[start:start + step]
        if torch.is_grad_enabled() and h.requires_grad and h.shape[0] > step:
            pieces.append(checkpoint(_chunk_logps, hs, ys, head, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(hs, ys, head, softcap))
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return out.index_put((rows, cols + 1), flat)


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, **kw) -> Tensor:
    """(B,) summed log-probs of the scored tokens of each row."""
    return token_logps(model, input_ids, attention_mask, loss_mask, **kw).sum(-1)
