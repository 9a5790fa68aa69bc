"""Per-token log-probs of the labels, in fp32, without the batch's full-vocabulary log-softmax.

The trunk returns hidden states; only the positions that are scored (completion tokens) go
through the output head, in chunks of at most `chunk_mb` of fp32 logits. With gradients on, each
chunk is checkpointed: its logits are recomputed in backward instead of being kept, so the
memory held for logits is one chunk, whatever the vocabulary or the batch. log p(y) is computed as
logit[y] - logsumexp(logits) in fp32, so bf16 autocast never reaches the normaliser.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import row_hidden_states
from .load import backbone_and_head, hidden_states, unwrap
from .prompt_once import prompt_once_hidden_states


def _chunk_logits(hidden: Tensor, head: torch.nn.Module, softcap: float | None, temperature: float) -> Tensor:
    logits = head(hidden)  # (n, V)
    logits = logits.float() if logits.dtype != torch.float64 else logits  # fp32 at least (fp64 kept for tests)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature if temperature != 1.0 else logits


def _chunk_logps(hidden: Tensor, labels: Tensor, head: torch.nn.Module, softcap: float | None,
                 temperature: float = 1.0) -> Tensor:
    logits = _chunk_logits(hidden, head, softcap, temperature)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)


def _chunks(model, n: int, chunk_mb: float):
    head = backbone_and_head(model)[1]
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    rows = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 leaves an empty tensor outside the call
    step = max(1, int(chunk_mb * 2**20 // (4 * rows)))
    return head, softcap, step, [(start, start + step) for start in range(0, n, step)]


def _scored_logps(model, hidden: Tensor, y: Tensor, chunk_mb: float, temperature: float = 1.0) -> Tensor:
    """log p(y_i | state h_i) for N (state, label) pairs, chunked over N: (N, H), (N,) -> (N,).
    `temperature` scores under the tempered distribution softmax(logits / T) that sampling used."""
    head, softcap, step, spans = _chunks(model, hidden.shape[0], chunk_mb)
    pieces = []
    for a, b in spans:
        hs, ys = hidden[a:b], y[a:b]
        if torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > step:
            pieces.append(checkpoint(_chunk_logps, hs, ys, head, softcap, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(hs, ys, head, softcap, temperature))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def kl_from_logps(logp: Tensor, logq: Tensor) -> Tensor:
    """(..., V) log-softmaxes -> (...): the exact KL(p || q) = sum_v p(v) (log p(v) - log q(v))."""
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy_from_logps(logp: Tensor) -> Tensor:
    """(..., V) log-softmax -> (...): the entropy -sum_v p(v) log p(v)."""
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def _scored_entropy(model, hidden: Tensor, chunk_mb: float, temperature: float = 1.0) -> Tensor:
    """Entropy of the (tempered) next-token distribution at N states, chunked: (N, H) -> (N,)."""
    head, softcap, _, spans = _chunks(model, hidden.shape[0], chunk_mb)
    pieces = []
    for a, b in spans:
        logp = torch.log_softmax(_chunk_logits(hidden[a:b], head, softcap, temperature), -1)
        pieces.append(entropy_from_logps(logp))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def completion_logps(model, input_ids: Tensor, attention_mask: Tensor, n_prompt: int, completion_mask: Tensor, *,
                     chunk_mb: float = 128.0, temperature: float = 1.0, entropy: bool = False,
                     hidden_out: bool = False) -> dict[str, Tensor]:
    """Rows laid out as generation saw them, [left-padded prompt (n_prompt cols) | completion]:
    `logps` (B, Tc) of each completion token (0 on padding), and on request the `entropy` (B, Tc)
    of the distribution it was drawn from and the `hidden` states (B, Tc, H) that predicted it
    (where a value head reads V(s_t)). Positions come from the attention mask, as in generation."""
    states = hidden_states(model, input_ids, attention_mask)[:, n_prompt - 1:-1]  # (B, Tc, H): before token t
    labels = input_ids[:, n_prompt:]  # (B, Tc)
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    flat = _scored_logps(model, states[rows, cols], labels[rows, cols], chunk_mb, temperature)
    out = {"logps": torch.zeros(labels.shape, dtype=flat.dtype, device=labels.device).index_put((rows, cols), flat)}
    if entropy:
        out["entropy"] = torch.zeros_like(out["logps"]).index_put(
            (rows, cols), _scored_entropy(model, states[rows, cols].detach(), chunk_mb, temperature))
    if hidden_out:
        out["hidden"] = states
    return out


def token_logps(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, *,
                chunk_mb: float = 128.0) -> Tensor:
    """(B, T) log p(x_t | x_<t) at every scored position t (loss_mask[t] true), 0 elsewhere.

    loss_mask marks the tokens to score (completion tokens); position 0 can never be scored.
    """
    trunk = backbone_and_head(model)[0]
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    return _row_logps(model, hidden, input_ids, loss_mask, chunk_mb)


def _row_logps(model, hidden: Tensor, input_ids: Tensor, loss_mask: Tensor, chunk_mb: float) -> Tensor:
    """(B, T) log-probs of the scored tokens of rows whose hidden states are `hidden` (B, T, H)."""
    rows, cols = loss_mask[:, 1:].bool().nonzero(as_tuple=True)  # token cols+1 is scored
    flat = _scored_logps(model, hidden[rows, cols], input_ids[rows, cols + 1], chunk_mb)  # (N,)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return out.index_put((rows, cols + 1), flat)


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, **kw) -> Tensor:
    """(B,) summed log-probs of the scored tokens of each row."""
    return token_logps(model, input_ids, attention_mask, loss_mask, **kw).sum(-1)


def batch_logps(model, batch: dict[str, Tensor], chunk_mb: float = 128.0) -> Tensor:
    """Summed completion log-probs of every sequence of a collated batch, in its slot-major order,
    from either layout: padded rows (`collate`) or rows (`collate_shared_prompt`, `collate_packed`),
    whose mask is built for the model's attention implementation (models/attention.py), or prompt-once
    rows (`collate_prompt_once`: continuations of a state, models/prompt_once.py)."""
    if "prompt_ids" in batch:
        hidden = prompt_once_hidden_states(model, batch)  # (S*B, C, H)
        return _row_logps(model, hidden, batch["input_ids"], batch["loss_mask"], chunk_mb).sum(-1)
    if "pred_rows" not in batch:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                              chunk_mb=chunk_mb)
    hidden = row_hidden_states(model, batch)  # (B, T, H)
    flat = _scored_logps(model, hidden[batch["pred_rows"], batch["pred_cols"]], batch["labels_flat"], chunk_mb)
    out = torch.zeros(len(batch["lengths"]), dtype=torch.float32, device=flat.device)
    return out.index_add(0, batch["seq_ids"], flat)


def completion_states(model, input_ids: Tensor, attention_mask: Tensor, n_prompt: int,
                      completion_mask: Tensor) -> Tensor:
    """(N, H) hidden states that predict the N real completion tokens (row-major), as generation saw them."""
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    return hidden_states(model, input_ids, attention_mask)[:, n_prompt - 1:-1][rows, cols]


def _chunk_kl(hp: Tensor, hq: Tensor, head_p, softcap_p, head_q, softcap_q, temperature: float) -> Tensor:
    logp = torch.log_softmax(_chunk_logits(hp, head_p, softcap_p, temperature), -1)  # (n, V)
    with torch.no_grad():
        logq = torch.log_softmax(_chunk_logits(hq, head_q, softcap_q, temperature), -1)
    return kl_from_logps(logp, logq)


def states_kl(policy, states_p: Tensor, reference, states_q: Tensor, *, chunk_mb: float = 128.0,
              temperature: float = 1.0) -> Tensor:
    """Exact KL(p || q) of the (tempered) next-token distributions over the full vocabulary at N
    states: (N, H), (N, H) -> (N,). Differentiable in the policy's states (the reference side is
    constant), each chunk checkpointed, so one chunk of (n, V) logits is held at a time."""
    head_p, softcap_p, step, spans = _chunks(policy, states_p.shape[0], chunk_mb)
    head_q, softcap_q, _, _ = _chunks(reference, states_p.shape[0], chunk_mb)
    pieces = []
    for a, b in spans:
        args = (states_p[a:b], states_q[a:b], head_p, softcap_p, head_q, softcap_q, temperature)
        if torch.is_grad_enabled() and states_p.requires_grad and states_p.shape[0] > step:
            pieces.append(checkpoint(_chunk_kl, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_kl(*args))
    return torch.cat(pieces) if pieces else states_p.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def completion_kl(policy, reference, input_ids: Tensor, attention_mask: Tensor, n_prompt: int,
                  completion_mask: Tensor, *, chunk_mb: float = 128.0, temperature: float = 1.0,
                  reference_ctx=nullcontext) -> dict[str, Tensor]:
    """Exact KL(policy || reference) of the next-token distributions softmax(logits / T) at every
    completion position of rows laid out as `completion_logps` takes them, from the full vocabulary
    (not a one-sample log-ratio): `kl` (B, Tc) and the policy's `entropy` (B, Tc), 0 on padding.
    `reference_ctx` wraps the reference pass (a LoRA model with its adapters disabled)."""
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    args = (input_ids, attention_mask, n_prompt, completion_mask)
    states_p = completion_states(policy, *args)
    with reference_ctx():
        states_q = completion_states(reference, *args)
        kl = states_kl(policy, states_p, reference, states_q, chunk_mb=chunk_mb, temperature=temperature)
    ent = _scored_entropy(policy, states_p, chunk_mb, temperature)
    zeros = torch.zeros(completion_mask.shape, dtype=kl.dtype, device=input_ids.device)
    return {"kl": zeros.index_put((rows, cols), kl), "entropy": zeros.clone().index_put((rows, cols), ent)}
