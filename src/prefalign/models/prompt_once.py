"""Prompt-once rows for state-space models: each pair's prompt runs through the model once, and the
chosen and rejected answers continue from copies of its recurrent state (every Mamba layer's conv
and SSM state, and a hybrid's attention keys and values). The copies are out-of-place index
selections, so autograd sums both answers' gradients into the prompt's computation. Log-probs and
gradients equal the padded layout's (tests/test_ssm_prompt_once.py, fp32).

Why not shared-prompt rows (models/arch.py): a Mamba layer reads no attention mask, so a rejected
answer laid after the chosen one in a row would be read in the chosen one's state.

Prompts of different lengths share one left-padded (B, P) batch (data/batches.py
`collate_prompt_once`). Padding is not free in a recurrent layer (the conv has a bias, and each step
decays the state), so the pads must leave the state exactly as a sequence starts: a zero SSM state
and zero conv inputs. They do, because every pad's input is zeroed before the convolution and after
it (transformers' mixers multiply by the 2D mask there; the Mamba-1 route below does the same):
- the conv input at a pad is in_proj(0) = 0 exactly, the zero a convolution pads a sequence start
  with, provided in_proj has no bias (a biased in_proj is refused, `prompt_once_problem`); the conv
  bias is added after, to outputs that are zeroed at pads;
- the scan's input term at a pad is dt * B * x with x = 0 (and B = 0): exactly 0, so a zero state
  times any decay stays exactly 0 until the row's first real token.
Each row's state at the last column is then its state at its own last prompt token.

Two routes, by architecture (`ROUTES`):
- "cache": transformers' own forward with its cache (5.x), for Mamba-2 and the hybrids of Mamba-2
  and attention layers. The continuation gets the prompt's 2D mask in front of its own and its
  positions after each row's own prompt, as generation does after a left-padded prompt.
- "layers": Mamba-1 run here layer by layer, with transformers' torch-path operations
  (modeling_mamba.py). transformers cannot continue it with gradients: its cached multi-token scan
  starts from a zero state (its own TODO), and its one-token update writes the state in place.
  Jamba's Mamba-1 layers sit inside transformers' decoder layers: not supported.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor

from ..errors import ModelError
from .arch import model_type
from .load import position_kwargs, trunk_of, unwrap

# model_type -> route; each entry is proven equal to padded rows by tests/test_ssm_prompt_once.py
ROUTES = {"mamba": "layers", "mamba2": "cache", "bamba": "cache", "falcon_h1": "cache", "nemotron_h": "cache",
          "granitemoehybrid": "cache"}
# where `share_prompt: auto` picks them: (model_type, device type) measured faster than padded rows
# (benchmarks/ssm_prompt_once.py, results in benchmarks/results/ssm-prompt-once-*); elsewhere they are taken
# when asked (`share_prompt: true`), `not_faster` says why
FASTER = frozenset({("mamba", "cpu")})
UNSUPPORTED = {
    "jamba": "Jamba's Mamba-1 layers restart their scan from a zero state when continuing several tokens from a "
             "cache (transformers' torch path), so its answers would not see the prompt's SSM state",
}


def prompt_once_problem(model) -> str | None:
    """Why prompt-once rows would be wrong (or untested) for this model; None when they are exact."""
    hf, kind = unwrap(model), model_type(model)
    if kind not in ROUTES:
        return UNSUPPORTED.get(kind, f"{kind} is not a state-space model checked for prompt-once rows "
                                      "(prefalign.models.prompt_once.ROUTES)")
    if ROUTES[kind] == "cache" and int(transformers.__version__.split(".")[0]) < 5:
        return f"{kind}'s prompt-once rows continue transformers 5's cache; transformers {transformers.__version__}"
    biased = [name for name, m in hf.named_modules() if hasattr(m, "conv1d") and hasattr(m, "in_proj")
              and any(n.endswith("bias") for n, _ in m.in_proj.named_parameters())]
    if biased and ROUTES[kind] == "cache":
        return (f"{kind}'s Mamba in_proj has a bias ({biased[0]}): a left pad's conv input would be that bias, "
                "not the zero a sequence starts from")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in hf.modules()):
        return "gradient checkpointing: transformers drops its cache under it, and the Mamba-1 route does not recompute"
    device = next(hf.parameters()).device
    kernels = [k for k in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(k)]
    if device.type == "cuda" and kernels:
        return f"{' and '.join(kernels)} kernels: prompt-once rows are checked on transformers' torch path only"
    return None


def not_faster(model) -> str | None:
    """Why `share_prompt: auto` leaves this model on padded rows although prompt-once rows are exact; None
    where they were measured faster (FASTER)."""
    kind, device = model_type(model), next(unwrap(model).parameters()).device.type
    if (kind, device) in FASTER:
        return None
    if kind == "mamba":
        return (f"prompt-once rows are exact but measured faster only on CPU, not on {device} "
                "(benchmarks/results/ssm-prompt-once-cpu-2core.md); share_prompt: true takes them")
    return (f"prompt-once rows are exact on {kind} but not faster on short rows: transformers' chunked Mamba-2 "
            "scan pads each pass to whole chunks (benchmarks/results/ssm-prompt-once-mamba2-cpu-2core.md); "
            "share_prompt: true takes them")


def prompt_once_hidden_states(model, batch: dict[str, Tensor]) -> Tensor:
    """(S*B, C, H) last hidden states of the continuation rows of a `collate_prompt_once` batch."""
    route = ROUTES.get(model_type(model))
    if route is None:
        raise ModelError(f"prompt-once rows: {prompt_once_problem(model)}")
    p_ids, p_mask, ids, mask = batch["prompt_ids"], batch["prompt_mask"], batch["input_ids"], batch["attention_mask"]
    # continuation row k*B + i continues prompt i (slot-major rows: chosen_0.., rejected_0..)
    rows = torch.arange(p_ids.shape[0], device=ids.device).repeat(ids.shape[0] // p_ids.shape[0])
    trunk = trunk_of(model)
    if route == "layers":
        states = _mamba_layers(trunk, p_ids, p_mask, None)[1] if p_ids.shape[1] else None
        states = [(conv[rows], ssm[rows]) for conv, ssm in states] if states else None
        return _mamba_layers(trunk, ids, mask, states)[0]
    if not p_ids.shape[1]:  # no prompt token before any continuation: nothing to carry
        return trunk(input_ids=ids, attention_mask=mask).last_hidden_state
    if p_ids.shape[1] == 1 and not bool(p_mask.all()):
        # transformers drops the 2D mask of a one-column forward (a decode step, never padding: masking_utils
        # create_recurrent_attention_mask), so a pad would enter the state (mamba2: 0.19 nats off); one more
        # left pad column keeps the mask
        p_ids, p_mask = torch.cat([p_ids[:, :1], p_ids], 1), torch.cat([torch.zeros_like(p_mask[:, :1]), p_mask], 1)
    cache = trunk(input_ids=p_ids, attention_mask=p_mask, use_cache=True, **position_kwargs(trunk, p_mask)).cache
    if cache is None:
        raise ModelError(f"{type(trunk).__name__} returned no cache for prompt-once rows")
    cache.reorder_cache(rows)  # index_select per layer: out of place, so both answers' gradients reach the prompt
    full = torch.cat([p_mask[rows], mask], 1)  # (S*B, P + C): the prompt's pads stay masked for attention
    kw = {}
    if position_kwargs(trunk, full):  # positions after each row's own prompt tokens
        kw["position_ids"] = p_mask.sum(-1)[rows, None] + torch.arange(ids.shape[1], device=ids.device)
    return trunk(input_ids=ids, attention_mask=full, cache=cache, use_cache=True, **kw).last_hidden_state


def _mamba_layers(trunk, ids: Tensor, mask: Tensor, states: list[tuple[Tensor, Tensor]] | None):
    """MambaModel's forward from per-layer (conv inputs (N, I, K-1), SSM state (N, I, S)), zeros when
    None: (N, T, H) hidden states after norm_f, and every layer's state after the last column."""
    h, out = trunk.embeddings(ids), []
    for i, block in enumerate(trunk.layers):
        residual = h
        x = block.norm(h.to(dtype=block.norm.weight.dtype))
        if block.residual_in_fp32:
            residual = residual.to(torch.float32)
        y, state = _mamba_mixer(block.mixer, x, mask, states[i] if states else None)
        h = residual + y
        out.append(state)
    return trunk.norm_f(h), out


def _mamba_mixer(mixer, x: Tensor, mask: Tensor, state: tuple[Tensor, Tensor] | None):
    """transformers' MambaMixer torch path (modeling_mamba.py: conv, selective scan, gate), started
    from `state` instead of zeros: (N, T, H) out, (conv inputs, SSM state) after the last column."""
    dtype, m = x.dtype, mask[:, :, None]
    proj = mixer.in_proj((x * m).to(dtype)).transpose(1, 2)  # (N, 2I, T)
    u, gate = proj.chunk(2, dim=1)  # (N, I, T) each
    u = u * mask[:, None].to(u.dtype)  # a pad's conv input is exactly 0, whatever in_proj's bias
    k = mixer.conv_kernel_size - 1
    conv_state = state[0] if state else u.new_zeros(u.shape[0], u.shape[1], k)
    conv_in = torch.cat([conv_state, u], -1)  # (N, I, K-1+T): the window's left context, then this segment
    u = F.conv1d(conv_in.to(mixer.conv1d.weight.dtype), mixer.conv1d.weight, mixer.conv1d.bias,
                 groups=mixer.intermediate_size)  # (N, I, T)
    u = (mixer.act(u).to(dtype).transpose(1, 2) * m).to(dtype)  # (N, T, I), pads zeroed again
    time_step, b, c = torch.split(mixer.x_proj(u), [mixer.time_step_rank, mixer.ssm_state_size,
                                                     mixer.ssm_state_size], dim=-1)
    dt = mixer.dt_proj.weight @ time_step.transpose(1, 2)  # (N, I, T)
    ssm = state[1] if state else u.new_zeros(u.shape[0], u.shape[2], mixer.ssm_state_size)
    y, ssm = _scan(mixer, u.transpose(1, 2), dt, b, c, gate, ssm)
    return mixer.out_proj(y.transpose(1, 2).to(dtype)), (conv_in[..., conv_in.shape[-1] - k:], ssm)


def _scan(mixer, u: Tensor, dt: Tensor, b: Tensor, c: Tensor, gate: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' mamba_selective_scan (its sequential path), from the state `ssm` (N, I, S):
    u, dt, gate (N, I, T), b, c (N, T, S) -> ((N, I, T) gated output, the state after the last column)."""
    a = -torch.exp(mixer.A_log.float())  # (I, S)
    dt = F.softplus(dt + mixer.dt_proj.bias.float().to(dt.dtype)[..., None])
    decay = torch.exp(a[None, :, None, :] * dt[:, :, :, None])  # (N, I, T, S)
    inputs = dt[:, :, :, None] * b[:, None, :, :].float() * u[:, :, :, None].float()  # (N, I, T, S)
    ys = []
    # unbind, not decay[:, :, t]: each indexing's backward writes a zero tensor of the whole (N, I, T, S),
    # which made transformers' loop O(T^2) in backward; unbind's backward is one stack (same values)
    for decay_t, input_t, c_t in zip(decay.unbind(2), inputs.unbind(2), c.unbind(1), strict=True):
        ssm = decay_t * ssm + input_t
        ys.append(torch.matmul(ssm.to(u.dtype), c_t[:, :, None])[:, :, 0])  # (N, I)
    y = torch.stack(ys, dim=-1) + u * mixer.D.float()[None, :, None]
    return y * F.silu(gate), ssm
