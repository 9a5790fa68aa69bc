"""What an architecture's layers allow: can a custom 4D attention mask carve one row into
independent sequences (the shared-prompt and packed layouts), and which projections take LoRA.

The row layouts are only correct if EVERY token-mixing layer reads the mask. Mamba and Mamba-2
mixers (and the Mamba layers of Jamba, Bamba, Falcon-H1, Nemotron-H, Granite-4-H) run a recurrent
state along the whole row and never see the 4D mask, so a rejected answer laid after the chosen
one is read in the chosen one's state: wrong log-probs, silently (tiny Jamba: 6e-4 nats off). Those
models share the prompt another way: prompt-once rows (models/prompt_once.py).

Why an allow-list of model types rather than a scan for SSM modules: a scan can only deny what it
knows (Mamba, Mamba-2, gated DeltaNet, short convolutions, RG-LRU, RWKV, ... and whatever comes
next), and a miss is a silent wrong answer. The allow-list fails safe: an architecture not on it
gets the padded layout, which is always correct, only slower. Each entry is checked by
tests/test_ssm_layouts.py (shared-prompt and packed log-probs equal the padded ones).
"""

from __future__ import annotations

from .load import unwrap

# Model types whose every layer is softmax attention that takes a custom 4D mask as given.
PURE_ATTENTION = frozenset({
    "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3", "starcoder2",
})

# Config fields that only state-space / hybrid configs have: they name the cause in the error.
_SSM_FIELDS = ("layers_block_type", "attn_layer_indices", "hybrid_override_pattern", "mamba_d_state",
               "mamba_n_heads", "state_size", "ssm_state_size")


def _sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers, if it has any."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None  # qwen2 keeps a window size in its config even when no layer slides
    return int(window)


def model_type(model) -> str:
    """The config's model_type ("llama", "mamba", ...), or the class name where a config has none."""
    return getattr(unwrap(model).config, "model_type", "") or type(unwrap(model)).__name__


def block_mask_problem(model, max_length: int | None = None) -> str | None:
    """Why the shared-prompt / packed layouts would give wrong log-probs on this model; None if they
    are exact. max_length: the longest sequence, checked against sliding windows, which transformers
    does not apply to a custom 4D mask (it takes the mask as given)."""
    config = unwrap(model).config
    kind = model_type(model)
    if kind not in PURE_ATTENTION:
        if "mamba" in kind or any(hasattr(config, f) for f in _SSM_FIELDS):
            return (f"{kind} has Mamba/SSM layers: they carry a recurrent state along the whole row and "
                    "ignore the attention mask, so a sequence laid after another in one row is read in its state")
        return (f"{kind} is not a known pure-attention architecture (prefalign.models.arch.PURE_ATTENTION); "
                "a layer that ignores the 4D mask would mix the sequences of a row")
    window = _sliding_window(config)
    if window is not None and max_length is not None and max_length > window:
        return (f"{kind}'s sliding-window layers ({window} tokens) ignore their window under a custom "
                f"4D mask, and max_length {max_length} exceeds it")
    return None


def honours_block_mask(model, max_length: int | None = None) -> bool:
    """True where every token-mixing layer honours a custom 4D attention mask (see module doc)."""
    return block_mask_problem(model, max_length) is None
