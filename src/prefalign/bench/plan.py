"""Peak memory of a training run, term by term, from the architecture and the run's settings alone:
the formulas behind `prefalign plan` (bench/planner.py reads config.json and the train config, and
measures the runtime). Nothing here loads weights or touches a device; every term is in bytes.

A step's memory is not a sum of everything at once: tensors come and go. The peak of a steady-state
step (step 2 on, when the optimizer state exists) is the larger of two phases:

    forward/backward = static + held gradients + max(head backward, top layer, bottom layer, reference pass)
    optimizer step   = static + gradients + optimizer state's temporaries
    static           = weights + reference + KL-monitor copy + optimizer state (+ DDP's gradient buckets)

plus the process's runtime (measured, not derived: bench/planner.py says how; on CPU the interpreter with
torch, transformers and the tokenizer, on GPU the CUDA context) and, on CPU, the tokenized data. Gradients and
activations rarely coexist in full: backward frees a layer's saved tensors as it allocates that
layer's weight gradients, so the forward/backward phase takes the larger of the two, not their sum.

The decoder layer modelled is the Llama family's (pre-norm RMSNorm, RoPE, grouped-query attention
through SDPA, gated SiLU MLP: llama, mistral, qwen2 and their kin), as transformers computes it;
other architectures are refused by the planner rather than guessed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 4 / 64  # bitsandbytes NF4: 4 bits a weight + one fp32 absmax per block of 64
LOGITS_BYTES = 4  # models/logps.py: the head's logits are fp32 whatever the compute dtype


@dataclass(frozen=True)
class Arch:
    """What the estimator needs of a Llama-family decoder, as config.json states it."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = True
    qkv_bias: bool = False  # qwen2: biases on q, k, v
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every Linear in a layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class Setup:
    """One run as memory sees it: the micro-batch's shape on one device and what is trained, held and how."""

    rows: int  # rows of one micro-batch on one device (2B padded pairs, B shared-prompt rows)
    row_len: int  # tokens per row, padding included (rows are padded to the longest)
    scored: int  # completion positions that go through the output head
    mask: bool  # a dense (rows, 1, T, T) mask is passed (shared/packed rows, or padded rows with padding)
    lora_r: int | None = None  # None: full fine-tune
    lora_targets: tuple[str, ...] = PROJECTIONS
    base_bytes: float = 4.0  # bytes per base weight as loaded: 4 fp32, 2 bf16/fp16
    quantized: bool = False  # QLoRA: the layers' Linear weights in NF4, the rest at base_bytes
    act_bytes: int = 4  # activations' dtype: 4 fp32, 2 under bf16 autocast or bf16 weights
    autocast: bool = False  # bf16 autocast (precision: bf16)
    checkpointing: bool | str = False  # False, True, or "selective"
    logits_chunk_mb: float = 128.0
    reference: str | None = None  # "precompute" | "adapter" | "copy" | None (reference-free)
    examples: int = 0  # examples in the data (the precomputed table has one row each)
    slots: int = 2  # sequences per example (pairs 2, SFT 1)
    grad_accum: int = 1
    monitor_copy: bool = False  # the KL monitor holds a frozen copy of the starting weights
    scores: bool = False  # a reward model: a scalar head, no vocabulary logits
    foreach: bool = False  # AdamW's multi-tensor path (CUDA); CPU runs it tensor by tensor
    gpus: int = 1
    strategy: str = "ddp"  # with gpus > 1: "ddp" (replicated) or "fsdp" (sharded)
    runtime: int = 0  # measured baseline of the process (bench/planner.py says how)
    host_data: int = 0  # tokenized data held in this process's memory (CPU runs)

    @property
    def tokens(self) -> int:
        return self.rows * self.row_len

    @property
    def full(self) -> bool:
        return self.lora_r is None


@dataclass
class Breakdown:
    """Every term in bytes, the two phases, and the peak; `terms` keeps the order they print in."""

    terms: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    peak: float = 0.0
    peak_phase: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- parameters and weights


def layer_params(a: Arch) -> int:
    """One decoder layer: the seven projections' weights (in x out), their biases where the
    architecture has them, and two RMSNorm weights (H each)."""
    proj = a.projections()
    n = sum(i * o for i, o in proj.values()) + 2 * a.hidden
    n += (a.q_dim + 2 * a.kv_dim) * a.qkv_bias + a.hidden * a.o_bias
    return n + (2 * a.intermediate + a.hidden) * a.mlp_bias


def param_count(a: Arch) -> dict[str, int]:
    """Embedding V x H, L layers, the final norm H, and a head V x H unless tied to the embedding
    (a tied head is the same tensor: counted once)."""
    parts = {"embedding": a.vocab * a.hidden, "layers": a.layers * layer_params(a), "final_norm": a.hidden,
             "head": 0 if a.tied else a.vocab * a.hidden}
    return {**parts, "total": sum(parts.values())}


def lora_params(a: Arch, r: int, targets: tuple[str, ...]) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted projection of every layer: r (in + out)."""
    proj = a.projections()
    return a.layers * sum(r * (proj[t][0] + proj[t][1]) for t in targets if t in proj)


def base_weights(a: Arch, s: Setup) -> float:
    """The model as loaded: every weight at `base_bytes`; QLoRA holds the layers' projections at NF4's
    4.5 bits a weight and the embeddings and norms at base_bytes (bitsandbytes quantizes Linear layers)."""
    total = param_count(a)["total"]
    if not s.quantized:
        return total * s.base_bytes
    linear = a.layers * sum(i * o for i, o in a.projections().values())
    return linear * NF4_BYTES + (total - linear) * s.base_bytes


def weights(a: Arch, s: Setup) -> float:
    """The base as loaded plus the LoRA adapters in fp32 (PEFT's default, which prefalign keeps: an fp32
    adapter is its own master copy). A full fine-tune is loaded in fp32 (train/config.py refuses bf16
    weights there), so base_bytes is 4 for it."""
    return base_weights(a, s) + (0 if s.full else 4 * lora_params(a, s.lora_r, s.lora_targets))


def trainable(a: Arch, s: Setup) -> int:
    """Trained parameters: every weight in a full fine-tune, the adapters with LoRA."""
    return param_count(a)["total"] if s.full else lora_params(a, s.lora_r, s.lora_targets)


def largest_trainable(a: Arch, s: Setup) -> int:
    """The biggest single trained tensor: CPU AdamW's temporaries are the size of one tensor."""
    if s.full:
        return max(a.vocab * a.hidden, max(i * o for i, o in a.projections().values()))
    proj = a.projections()
    return max((s.lora_r * max(proj[t]) for t in s.lora_targets if t in proj), default=0)


def optimizer_state(n_trainable: int) -> float:
    """AdamW keeps exp_avg and exp_avg_sq, one fp32 each per trained parameter: 8 bytes a parameter."""
    return 8.0 * n_trainable


def optimizer_temporaries(a: Arch, s: Setup) -> float:
    """AdamW's step allocates its denominator sqrt(v)/sqrt(1-b2^t) + eps. On CPU torch steps tensor by
    tensor (`_single_tensor_adam`: sqrt, then the division, each a new tensor): 2 x 4 bytes x the
    largest trained tensor. On CUDA the multi-tensor path takes sqrt of a whole parameter group at once:
    4 bytes x the group (the matrices' group holds nearly every trained parameter)."""
    if s.foreach:
        return 4.0 * trainable(a, s)
    return 2 * 4.0 * largest_trainable(a, s)


def reference(a: Arch, s: Setup) -> float:
    """precompute: a table of one fp32 log-prob per sequence (examples x slots x 4). adapter: the same
    weights with the adapters switched off, nothing extra. copy: a frozen deep copy of the model as
    loaded, before LoRA (same dtype as the base)."""
    if s.reference == "precompute":
        return 4.0 * s.examples * s.slots
    if s.reference == "copy":
        return base_weights(a, s)
    return 0.0


# ---------------------------------------------------------------- activations


def _mp_bf16(s: Setup) -> bool:
    """FSDP with bf16 (train/parallel.py): MixedPrecisionPolicy gathers every unit's weights, adapters
    included, in bf16, so the model computes as a bf16 model: nothing for autocast to cast."""
    return _shards(s) > 1 and s.autocast


def compute_bytes(s: Setup) -> float:
    """Bytes of a weight as the matmuls see it: the gathered bf16 copy under FSDP with bf16, else as loaded;
    the residual stream and the norms' outputs have this dtype."""
    return 2.0 if _mp_bf16(s) else s.base_bytes


def _trained(s: Setup) -> frozenset[str]:
    return frozenset(PROJECTIONS if s.full else s.lora_targets)


def linear_input_bytes(s: Setup) -> int:
    """Bytes a trained Linear keeps of each input element: under autocast the bf16 cast it multiplied;
    an fp32 adapter on a bf16 base keeps the fp32 copy PEFT casts its input to; otherwise the input."""
    if s.autocast:
        return 2
    return s.act_bytes if s.full else 4


def _casts_inputs(s: Setup) -> bool:
    """Whether each trained projection casts its input to a dtype of its own (see `linear_inputs`)."""
    if _mp_bf16(s):
        return False  # weights, adapters and activations all bf16 already
    return s.autocast or (not s.full and s.act_bytes != 4)


def linear_inputs(a: Arch, s: Setup) -> float:
    """Bytes per token of the trained Linears' saved inputs. Where the input must change dtype first (bf16
    autocast casts it for each matmul; PEFT casts a bf16 input to each fp32 adapter's dtype), every trained
    projection keeps its own copy: q, k, v, gate and up an H each, o_proj q_dim, down_proj I (measured with
    autograd's saved tensors); but a full fine-tune's o_proj under autocast takes the SDPA output, bf16
    already, as it is. Otherwise projections sharing an input share its storage: H for q/k/v, H for
    gate/up, I for down_proj, and o_proj's input is the SDPA output already counted."""
    t, proj = _trained(s), a.projections()
    if _casts_inputs(s):
        own = t - {"o_proj"} if s.full else t
        return sum(proj[p][0] for p in own) * linear_input_bytes(s)
    shared = (a.hidden * bool(t & {"q_proj", "k_proj", "v_proj"}) + a.hidden * bool(t & {"gate_proj", "up_proj"})
              + a.intermediate * ("down_proj" in t))
    return shared * linear_input_bytes(s)


def layer_activations(a: Arch, s: Setup) -> float:
    """Bytes autograd keeps per token in one decoder layer without checkpointing, op by op as transformers
    computes a Llama layer. A Linear keeps its input only where its weight (or an adapter on it) is
    trained: its input's gradient needs the weight, not the input. Every op the gradient passes through
    keeps what its own backward needs, trained or not, because the layers below still need the gradient:
      2 RMSNorms: the input upcast to fp32, kept by pow and by the rsqrt product (H x 4), and the rsqrt
        (1 x 4); with a trained norm weight (full fine-tune) also the normalised states it multiplies, in
        the residual stream's dtype, the weights' (H x base_bytes: fp32 even under autocast);
      attention: q and the SDPA output (q_dim each), k and v (kv_dim, or repeated to q_dim when a mask is
        passed: transformers hands SDPA grouped K/V only without one), log-sum-exp per head (fp32);
      gated MLP: SiLU's input (gate), its output and `up` (the product's operands): 3 I;
      trained Linears' inputs: `linear_inputs`;
      LoRA: A's output (r per adapted projection), which B's weight gradient needs.
    e = act_bytes. The dense mask SDPA also keeps is per row, not per token: `mask_activations`."""
    e, t = s.act_bytes, _trained(s)
    kv = a.q_dim if s.mask else a.kv_dim
    b = 2 * (a.hidden + 1) * 4 + (2 * a.hidden * compute_bytes(s) if s.full else 0)
    b += (2 * a.q_dim + 2 * kv) * e + a.heads * 4
    b += 3 * a.intermediate * e
    b += linear_inputs(a, s)
    if not s.full:
        b += s.lora_r * len(t & set(PROJECTIONS)) * linear_input_bytes(s)
    return b


def selective_activations(a: Arch, s: Setup) -> float:
    """gradient_checkpointing: selective (models/load.py `keep_matmuls`) keeps per token the layer's input
    (H) and the outputs of its matmuls and attention: q, k, v, the SDPA output and its log-sum-exp,
    o_proj's, gate's, up's and down_proj's outputs, and the adapters' A outputs; the rest is recomputed."""
    e = s.act_bytes
    b = (a.hidden * 3 + a.q_dim * 2 + a.kv_dim * 2 + 2 * a.intermediate) * e + a.heads * 4
    return b + (0 if s.full else s.lora_r * len(_trained(s)) * e)


def saved_per_layer(a: Arch, s: Setup) -> float:
    """Per token and layer, what stays saved from forward to backward: everything without checkpointing;
    only the layer's input (the checkpoint's argument, H) with `gradient_checkpointing: true`."""
    if s.checkpointing == "selective":
        return selective_activations(a, s)
    if s.checkpointing:
        return a.hidden * s.act_bytes
    return layer_activations(a, s)


def mask_activations(a: Arch, s: Setup, layers: int) -> float:
    """A dense (rows, 1, T, T) bool mask once, and, in each of `layers` layers, the copy SDPA converts it to
    (the query's dtype, kept for its backward): rows x T^2 x (1 + layers x e). Negligible at short rows,
    it grows with T^2: at T 4096 and 8 rows, 0.5 GB per layer in fp32."""
    if not s.mask:
        return 0.0
    return s.rows * s.row_len**2 * (1 + layers * s.act_bytes)


def outside_layers(a: Arch, s: Setup) -> float:
    """Saved outside the layers: the final RMSNorm (like a layer's norm, per token), RoPE's cos and sin
    (head_dim each per token, shared by every layer), and the scored positions' hidden states gathered
    for the output head (scored x H)."""
    e = s.act_bytes
    per_token = a.hidden * 4 + (a.hidden * compute_bytes(s) if s.full else 0) + 2 * a.head_dim * e
    return s.tokens * per_token + s.scored * a.hidden * e


def logits_chunk(a: Arch, s: Setup) -> tuple[float, bool]:
    """(bytes of one chunk of fp32 logits, whether the chunk stays saved until backward). models/logps.py
    sends the scored positions through the head in chunks of floor(logits_chunk_mb MiB / (4 V)) positions;
    with more than one chunk each is checkpointed (recomputed in backward), a single chunk is kept."""
    if s.scores or s.scored == 0:
        return 0.0, False
    step = max(1, int(s.logits_chunk_mb * 2**20 // (LOGITS_BYTES * a.vocab)))
    return min(s.scored, step) * a.vocab * LOGITS_BYTES, s.scored <= step


def layer_working_set(a: Arch, s: Setup) -> float:
    """Per token, the most a layer's backward (or a no-grad forward) holds beyond what was saved: in the
    MLP's backward the product's gradient, the gradients of SiLU's output and of `up` (3 I), and the
    residual stream's gradient and the input gradient being summed (2 H); attention's backward holds
    the gradients of q, k, v and of its output (4 q_dim). The larger of the two."""
    return max(3 * a.intermediate + 2 * a.hidden, 4 * a.q_dim + a.hidden) * s.act_bytes


def layer_casts(a: Arch, s: Setup) -> float:
    """Under bf16 autocast each matmul casts its fp32 weight to bf16 and the cast is kept for the input's
    gradient until that layer's backward: 2 bytes per projection weight of one layer where the base is
    fp32, and 2 bytes per adapter weight (fp32 adapters are cast on any base). None without autocast."""
    if not s.autocast or _mp_bf16(s):
        return 0.0
    base = sum(i * o for i, o in a.projections().values()) if s.base_bytes == 4 else 0
    adapters = 0 if s.full else lora_params(a, s.lora_r, s.lora_targets) // a.layers
    return 2.0 * (base + adapters)


def autocast_casts(a: Arch, s: Setup) -> float:
    """Every layer's weight casts (`layer_casts`) and a head computed in bf16 from fp32 weights, held like
    activations."""
    head = 2.0 * a.vocab * a.hidden if s.autocast and s.base_bytes == 4 and not _mp_bf16(s) else 0.0
    return a.layers * layer_casts(a, s) + head


def activations(a: Arch, s: Setup) -> dict[str, float]:
    """The activation terms of one micro-batch: `saved` (kept from forward to backward: the layers, the
    mask, what is outside the layers, autocast's weight casts, a single logits chunk), the single chunk
    `kept` in it, `logits` at the head's backward (4 chunks: see `phases`), `recompute` (the one layer a
    checkpointed backward rebuilds, with its converted mask), `work` (a layer's backward working set)."""
    chunk, kept = logits_chunk(a, s)
    mask_layers = 0 if s.checkpointing else a.layers  # checkpointed: the converted mask lives in one layer
    saved = {"layers": s.tokens * a.layers * saved_per_layer(a, s), "mask": mask_activations(a, s, mask_layers),
             "outside": outside_layers(a, s), "casts": autocast_casts(a, s), "kept": chunk if kept else 0.0}
    mask_copy = mask_activations(a, s, 1) - mask_activations(a, s, 0)  # one layer's float copy of the mask
    recompute = s.tokens * layer_activations(a, s) + mask_copy if s.checkpointing else 0.0
    return {**saved, "saved": sum(saved.values()), "chunk": chunk, "recompute": recompute,
            "work": s.tokens * layer_working_set(a, s), "mask_copy": mask_copy}


def phases(a: Arch, s: Setup, static: float, grads: float, act: dict[str, float]) -> dict[str, float]:
    """The candidates for a step's peak (static: what every phase holds):
      head: backward starts at the output head, with every activation saved; one logits chunk's
        backward holds 4 chunks (its logits, logsumexp's exp(x - lse), that times the incoming gradient,
        and gather's scattered gradient; measured so on CPU) and, in a full fine-tune, the head's (tied
        embedding's) weight gradient (V x H x 4) is allocated there, once the chunk's logits are freed;
      top_layer / bottom_layer: a layer's backward holds its working set (and, checkpointed, the layer it
        rebuilds); at the top every layer's activations are still saved, at the bottom nearly every
        weight gradient exists: backward trades one for the other, so the larger end is the peak;
      reference: the adapter-off or copy reference's no-grad forward runs after the policy's, with the
        policy's activations saved: a layer's working set, its float copy of the mask, and a forward
        logits chunk (its logits and logsumexp's exp: 2 chunks, measured so on CPU);
      optimizer_step: every gradient, the optimizer state and the step's temporaries.
    With grad_accum > 1 the gradients of earlier micro-batches are held through the whole backward."""
    head_grad = 4.0 * a.vocab * a.hidden if s.full else 0.0
    held = grads if s.grad_accum > 1 else 0.0
    at_head = max(held, head_grad)
    after_head = act["saved"] - act["kept"]
    per_layer = act["layers"] / a.layers + act["mask"] / max(1, a.layers)
    # a single chunk: its 4-chunk moment passes before the head's weight gradient is allocated (then only
    # the logits' gradient is left); with several, later chunks run their 4 beside that gradient
    single = act["kept"] > 0
    head = max(4 * act["chunk"] + held, act["chunk"] + at_head) if single else 4 * act["chunk"] + at_head
    out = {
        "head": after_head + head,
        "top_layer": after_head + act["recompute"] + act["work"] + at_head,
        "bottom_layer": after_head - act["layers"] - act["mask"] + per_layer + act["recompute"] + act["work"] + grads,
    }
    if s.reference in ("adapter", "copy"):
        out["reference"] = act["saved"] + act["work"] + act["mask_copy"] + 2 * act["chunk"] + held
    out = {k: static + v for k, v in out.items()}
    # by the step FSDP has reduce-scattered and freed the gathered units' gradients: only the shards remain
    out["optimizer_step"] = static + 4.0 * trainable(a, s) / _shards(s) + optimizer_temporaries(a, s) / _shards(s)
    return out


def _shards(s: Setup) -> int:
    return s.gpus if s.gpus > 1 and s.strategy == "fsdp" else 1


def fsdp_gathered(a: Arch, s: Setup) -> float:
    """Parameters FSDP2 holds whole at once (train/parallel.py shards each decoder layer, then the root): one
    layer while it computes, and the root unit (embedding, final norm and an untied head), which stays
    gathered from the forward's start to the backward's end."""
    if _shards(s) == 1:
        return 0
    parts = param_count(a)
    return layer_params(a) + parts["embedding"] + parts["final_norm"] + parts["head"]


def estimate(a: Arch, s: Setup) -> Breakdown:
    """Every term and the peak of one device (formulas in the functions above). Over N GPUs, FSDP shards
    weights, reference copy, gradients, optimizer state and its temporaries N ways and holds gathered what
    `fsdp_gathered` says (weights at compute_bytes and, trained, their fp32 gradients before the
    reduce-scatter); DDP replicates everything and adds its gradient buckets, a copy of every gradient
    (torch's default gradient_as_bucket_view=False). The micro-batch in `s` is already one device's share."""
    n = _shards(s)
    params, train = param_count(a)["total"], trainable(a, s)
    unit = fsdp_gathered(a, s)
    terms = {"runtime": float(s.runtime), "data": float(s.host_data),
             "weights": weights(a, s) / n + unit * compute_bytes(s), "reference": reference(a, s) / n,
             "monitor_copy": base_weights(a, s) / n if s.monitor_copy else 0.0,
             "gradients": 4.0 * train / n + (4.0 * unit if s.full else 0.0),
             "optimizer_state": optimizer_state(train) / n,
             "ddp_buckets": 4.0 * train if s.gpus > 1 and s.strategy == "ddp" else 0.0}
    static = (terms["weights"] + terms["reference"] + terms["monitor_copy"] + terms["optimizer_state"]
              + terms["ddp_buckets"])
    act = activations(a, s)
    steps = phases(a, s, static, terms["gradients"], act)
    terms.update({"optimizer_step_temporaries": optimizer_temporaries(a, s) / n,
                  "activations_layers": act["layers"], "attention_mask": act["mask"],
                  "activations_outside_layers": act["outside"] + act["casts"], "logits_chunk": act["chunk"],
                  "layer_recompute": act["recompute"], "layer_working_set": act["work"]})
    peak_phase = max(steps, key=steps.get)
    return Breakdown(terms=terms, phases=steps, trainable_params=train, total_params=params,
                     peak=terms["runtime"] + terms["data"] + steps[peak_phase], peak_phase=peak_phase)
