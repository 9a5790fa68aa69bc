"""Model FLOPs, counted honestly (Kaplan et al. 2020, §2.1: ~2N per token forward, ~4N backward).

prefalign's log-prob path applies the output head only at scored (completion) positions, so a step is
charged the blocks' FLOPs over every position computed and the head's over the scored ones only.
A training step on `tokens` tokens costs 6 N tokens when every weight is trained; with LoRA the
frozen weights get no weight gradient, so 4 N tokens (forward + the backward pass through the
activations). A reference forward adds 2 N tokens; a no-grad forward is 2 N tokens. N counts the
matmul weights of the blocks and the output head; the input embedding is a lookup (no FLOPs), so it
is left out of N (a tied head is counted once, as the head). Attention-score FLOPs are not counted.

A PPO iteration (`ppo_iteration_flops`) is charged the trunk over every position it computes and
the head only where it is applied: generation computes one position's logits per forward call
(prefill keeps only the last position's, then one per decode step), `completion_logps` only the
scored completion tokens."""

from __future__ import annotations


def llama_params(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 tied: bool = True) -> dict[str, int]:
    """Parameters of a Llama-shape model by hand: attention q, k, v, o; MLP gate, up, down; 2 RMSNorms
    per block and a final one; the embedding; the head unless tied."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * intermediate
    blocks = layers * (attn + mlp + 2 * hidden)
    embedding = vocab * hidden
    head = 0 if tied else vocab * hidden
    return {"total": embedding + blocks + hidden + head, "matmul": layers * (attn + mlp) + vocab * hidden,
            "embedding": embedding}


def matmul_params(model) -> int:
    """N for FLOP counting: 2-D weights of the blocks and the output head (not the input lookup)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = inner.get_input_embeddings().weight
    head = inner.get_output_embeddings()
    n = sum(p.numel() for p in inner.parameters() if p.ndim == 2 and p is not emb)
    if head is not None and head.weight is emb:  # tied: the head's matmul still happens
        n += emb.numel()
    return n


def step_flops(n: int, tokens: int, *, train: str = "full", reference_tokens: int = 0) -> float:
    """train: "full" (6N), "lora" (4N), "none" (2N: a forward only)."""
    per = {"full": 6, "lora": 4, "none": 2}[train]
    return per * n * tokens + 2 * n * reference_tokens


def head_params(model) -> int:
    """The output head's weights (vocabulary x hidden), 0 for models without one (reward models)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    return head.weight.numel() if head is not None else 0


def ppo_iteration_flops(n: int, head: int, hidden: int, *, rows: int, prompt: int, generated: int, scored: int,
                        epochs: int, train: str = "full", value_head: bool = True, entropy: bool = True) -> dict:
    """FLOPs of one iteration of `prefalign.train.ppo.run_rl`, by part (and "total").

    n: matmul parameters (head included), head: the output head's; rows: rollout rows; prompt: the
    left-padded prompt width; generated: the completion columns generation produced (every row runs
    until the last one stops); scored: completion tokens up to and including each row's EOS.
      generation: the trunk over prompt + generated - 1 positions per row (the last sampled token is
        never fed back), the head once per forward call: `generated` times per row.
      old log-probs + values (no grad): the trunk over every column, the head on scored tokens, again
        for the logged entropy (completion_logps recomputes the logits for it), the value head
        (hidden -> 1) on every completion column.
      reference (no grad): the trunk over every column, the head on scored tokens.
      update: `epochs` passes over all rows (the minibatches partition them), forward + backward:
        6x (full) or 4x (LoRA-frozen base) the forward; the value head is always trained (6x)."""
    trunk, cols, v = n - head, prompt + generated, hidden if value_head else 0
    per = {"full": 6, "lora": 4}[train]
    parts = {
        "generation": 2 * trunk * rows * (prompt + generated - 1) + 2 * head * rows * generated,
        "old_logprobs_values": (2 * trunk * rows * cols + 2 * head * scored * (2 if entropy else 1)
                                + 2 * v * rows * generated),
        "reference": 2 * trunk * rows * cols + 2 * head * scored,
        "update": epochs * (per * trunk * rows * cols + per * head * scored + 6 * v * rows * generated),
    }
    parts["rollout"] = parts["generation"] + parts["old_logprobs_values"] + parts["reference"]
    parts["total"] = parts["rollout"] + parts["update"]
    return parts
