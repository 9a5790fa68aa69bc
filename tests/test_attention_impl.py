"""attn_implementation: every attention implementation this machine has runs the shared-prompt and
packed rows to the padded layout's log-probs (and gradients, where it has a backward pass here);
FlexAttention gets a block mask built without any T x T tensor; an implementation the machine lacks is
a ConfigError that names the field, raised before any work.

Tolerances: rtol 1e-6 with atol 1e-5 in fp32. The summed log-probs of these ~100-token answers reach
~560 nats, where one fp32 ulp is 6e-5, so an absolute 1e-5 alone would demand better than the sum's
own resolution; 1e-6 relative is ~8 ulps there (measured: at most 6.1e-5 apart on values, 1.5e-5 on
gradient entries of up to 85). A mask that lets one sequence see another moves a sum by ~0.5 nats.
"""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import WORDS
from prefalign.data.batches import collate, collate_packed, collate_shared_prompt, dense_row_mask, tokenize_records
from prefalign.data.records import PreferencePair
from prefalign.errors import ConfigError
from prefalign.models.attention import FLEX_BLOCK, flex_block_mask, row_attention_mask, varlen_row
from prefalign.models.load import load_model
from prefalign.models.logps import batch_logps
from prefalign.models.scalar import load_scalar_model

LAYOUTS = {"shared_prompt": collate_shared_prompt, "packed": collate_packed}
TOL = dict(rtol=1e-6, atol=1e-5)
CUDA = torch.cuda.is_available()
NO_FLEX_BACKWARD = "torch's FlexAttention does not support backward on CPU: gradients are checked on a GPU"


def _flash_attn() -> bool:
    from importlib.util import find_spec

    return find_spec("flash_attn") is not None


@pytest.fixture(scope="module")
def batches(tokenizer):
    """Pairs of very different lengths (words per prompt, chosen, rejected), so that rows span three
    FlexAttention blocks of 128 tokens, block edges fall inside prompts, answers and packed sequences,
    some blocks are wholly one sequence (full blocks) and packed rows hold up to three sequences."""
    rng = random.Random(0)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    sizes = [(300, 60, 20), (100, 10, 90), (30, 40, 5), (15, 8, 30), (60, 20, 45), (5, 3, 12)]
    pairs = [PreferencePair(words(p), " " + words(c), " " + words(r)) for p, c, r in sizes]
    data = tokenize_records(tokenizer, pairs, max_length=512, max_prompt_length=384)
    idx = list(range(len(data)))
    out = {name: fn(data.examples, idx, tokenizer.pad_token_id) for name, fn in LAYOUTS.items()}
    out["padded"] = collate(data.examples, idx, tokenizer.pad_token_id)
    assert out["shared_prompt"]["input_ids"].shape[1] > 2 * FLEX_BLOCK
    assert len(out["packed"]["input_ids"]) < len(out["padded"]["input_ids"])  # rows hold several sequences
    return out


def _on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _logps_and_grads(model, batch):
    logps = batch_logps(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return logps.detach(), torch.autograd.grad(logps.sum(), params)


def _assert_same(got, want):
    values, grads = got
    torch.testing.assert_close(values, want[0], **TOL)
    for g, w in zip(grads, want[1], strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dense_mask_implementations_equal_padded(arch, impl, layout, tiny_models, batches):
    padded = _logps_and_grads(load_model(tiny_models[arch]), batches["padded"])
    model = load_model(tiny_models[arch], attn_implementation=impl)
    assert model.config._attn_implementation == impl
    _assert_same(_logps_and_grads(model, batches[layout]), padded)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_rows_equal_padded_values(arch, layout, tiny_models, batches):
    model = load_model(tiny_models[arch], attn_implementation="flex_attention")
    rows = batches[layout]
    # what travels with the batch is O(T) per row: no (B, 1, T, T) mask to build or move
    assert all(v.dim() <= 2 for v in rows.values()) and "attention_mask" not in rows
    mask = row_attention_mask(model, rows)
    b, t = rows["input_ids"].shape
    assert type(mask).__name__ == "BlockMask" and mask.shape == (b, 1, t, t)
    with torch.no_grad():
        want = batch_logps(load_model(tiny_models[arch]), batches["padded"])
        torch.testing.assert_close(batch_logps(model, rows), want, **TOL)


@pytest.mark.skipif(not CUDA, reason=NO_FLEX_BACKWARD)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_rows_equal_padded_gradients(layout, tiny_models, batches, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 means fp32 in both kernels
    padded = _logps_and_grads(load_model(tiny_models["llama"], device="cuda"), _on(batches["padded"], "cuda"))
    model = load_model(tiny_models["llama"], device="cuda", attn_implementation="flex_attention", training=True)
    _assert_same(_logps_and_grads(model, _on(batches[layout], "cuda")), padded)


def _listed(num, idx, n):
    """BlockMask's (B, 1, n) counts and (B, 1, n, n) indices -> (B, n, n) bools."""
    out = torch.zeros(num.shape[0], n, n, dtype=torch.bool)
    for b in range(num.shape[0]):
        for i in range(n):
            out[b, i, idx[b, 0, i, :num[b, 0, i]].long()] = True
    return out


@pytest.mark.parametrize("block", [FLEX_BLOCK, 16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_block_lists_cover_every_visible_block(layout, block, batches):
    """Skipping a block that some query sees would drop keys silently; a block listed as full is read
    without the mask. Checked against the dense rule, block by block; blocks of 16 put whole blocks
    inside answers, so a rejected block after a wholly chosen one is there to be wrongly called full."""
    rows = batches[layout]
    truth = dense_row_mask(rows["segment_ids"], rows["branch_ids"])[:, 0]  # (B, T, T): fine in a test
    mask = flex_block_mask(rows["segment_ids"], rows["branch_ids"], block=block)
    t = truth.shape[-1]
    n = -(-t // block)
    padded = torch.nn.functional.pad(truth, (0, n * block - t, 0, n * block - t))
    tiles = padded.view(-1, n, block, n, block).transpose(2, 3)  # (B, nq, nk, block, block)
    partial = _listed(mask.kv_num_blocks, mask.kv_indices, n)
    full = _listed(mask.full_kv_num_blocks, mask.full_kv_indices, n)
    assert not (partial & full).any()
    assert ((partial | full) >= tiles.any(-1).any(-1)).all()  # every visible block is listed
    real = (torch.arange(n * block) < t).view(n, block)
    real_tiles = real[:, None, :, None] & real[None, :, None, :]  # the kernel never reads columns past T
    assert (tiles | ~real_tiles).all(-1).all(-1)[full].all()  # a full block: every query sees every key
    assert not (partial | full).all(), "nothing was skipped: the block mask saves nothing"
    assert full.any(), "no full block: the rows do not exercise the unmasked path"


class _Sizes(TorchDispatchMode):
    """Records the size of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else [out]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_block_mask_never_holds_a_t_by_t_tensor(layout, batches):
    rows = batches[layout]
    b, t = rows["input_ids"].shape
    with _Sizes() as sizes:
        flex_block_mask(rows["segment_ids"], rows["branch_ids"])
    assert sizes.largest < t * t, (sizes.largest, t)  # the largest is O(B T) + O(B (T / 128)^2)
    with _Sizes() as dense:
        dense_row_mask(rows["segment_ids"], rows["branch_ids"])
    assert dense.largest >= b * t * t  # the measurement sees a dense mask when there is one


def test_packed_rows_read_as_varlen_sequences(batches):
    """flash_attention_2 gets no mask: transformers cuts the flattened row where position ids restart
    (prepare_fa_kwargs_from_position_ids). Those cuts must be exactly the sequences' starts (and each
    padding column alone); the kernel itself runs only on a CUDA GPU with flash_attn."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rows = batches["packed"]
    _, pos = varlen_row(rows)
    (cuts, _), _ = prepare_fa_kwargs_from_position_ids(pos)
    seg = rows["segment_ids"].reshape(-1)
    row_start = torch.arange(seg.numel()) % rows["segment_ids"].shape[1] == 0
    starts = row_start | (seg < 0) | torch.cat([torch.tensor([True]), seg[1:] != seg[:-1]])
    assert cuts[:-1].tolist() == starts.nonzero().view(-1).tolist()
    with pytest.raises(ConfigError, match="flash_attention_2 cannot run shared-prompt rows"):
        varlen_row(batches["shared_prompt"])


@pytest.mark.skipif(not (CUDA and _flash_attn()), reason="flash_attention_2 needs a CUDA GPU and flash_attn")
def test_flash_attention_packed_rows_equal_padded(tiny_models, batches):
    # FlashAttention has no fp32 kernel: bf16 weights, both layouts through the same varlen kernel
    # (transformers unpads the padded batch by its mask); bf16 keeps ~3 significant digits, hence 1e-2
    model = load_model(tiny_models["llama"], device="cuda", dtype=torch.bfloat16,
                       attn_implementation="flash_attention_2")
    want = batch_logps(model, _on(batches["padded"], "cuda"))
    got = batch_logps(model, _on(batches["packed"], "cuda"))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(CUDA and _flash_attn(), reason="this machine has FlashAttention")
def test_unavailable_flash_attention_is_a_config_error(tiny_models):
    with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2 needs a CUDA GPU"):
        load_model(tiny_models["llama"], attn_implementation="flash_attention_2")


def test_flex_attention_cannot_train_on_cpu_and_needs_a_model_that_has_it(tiny_models):
    with pytest.raises(ConfigError, match="attn_implementation: flex_attention cannot train on CPU"):
        load_model(tiny_models["llama"], attn_implementation="flex_attention", training=True)
    with pytest.raises(ConfigError, match="attn_implementation: flex_attention: GPT2LMHeadModel does not support"):
        load_model(tiny_models["gpt2"], attn_implementation="flex_attention")
    # reward models and critics (a scalar head) load the same way, and are trained the same way
    with pytest.raises(ConfigError, match="attn_implementation: flex_attention cannot train on CPU"):
        load_scalar_model(tiny_models["llama"], attn_implementation="flex_attention", training=True)
    with pytest.raises(ConfigError, match="attn_implementation: flex_attention: GPT2ForSequenceClassification"):
        load_scalar_model(tiny_models["gpt2"], attn_implementation="flex_attention")
    assert load_scalar_model(tiny_models["llama"], attn_implementation="eager").config._attn_implementation == "eager"


@pytest.mark.skipif(CUDA and _flash_attn(), reason="this machine has FlashAttention")
def test_a_run_stops_before_any_work_on_an_unavailable_implementation(tiny_models, pair_file, tmp_path):
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    out = tmp_path / "run"
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(pair_file), output=str(out),
                      max_steps=1, attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2"):
        train(cfg, log=lambda _: None, progress=False)
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("ref_logps*"))
    with pytest.raises(ValueError, match="attn_implementation"):
        make_config(method="dpo", model="m", data="d", output="o", attn_implementation="flash")


def test_flash_attention_gets_padded_rows_instead_of_a_shared_prompt(tiny_models):
    from prefalign.train.methods import METHODS, make_config
    from prefalign.train.offline import choose_layout

    model = load_model(tiny_models["llama"])
    model.config._attn_implementation = "flash_attention_2"  # what loading with it sets (needs CUDA here)
    cfg = dict(method="dpo", model="m", data="d", output="o")
    assert choose_layout(make_config(**cfg), model, METHODS["dpo"]) == "padded"
    assert choose_layout(make_config(**cfg, packing=True), model, METHODS["dpo"]) == "packed"
    with pytest.raises(ConfigError, match="share_prompt: true needs .*flash_attention_2 takes no mask"):
        choose_layout(make_config(**cfg, share_prompt=True), model, METHODS["dpo"])
