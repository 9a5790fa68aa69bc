"""`prefalign export`: a run's final/ as a merged HF folder and as a GGUF file, each read back by another
loader (transformers from the folder, transformers' GGUF reader from the file) and compared with the
model prefalign runs in process.

Tolerances: fp32 logits within 1e-5 (measured: 0 for GGUF F32, ~1e-6 for a merged LoRA, whose merge
adds B·A to W once instead of on every forward). The tiny models are initialised with std 0.3, not
0.02: with 0.02 the attention is nearly uniform and a wrong Q/K layout would move logits by less than
the tolerance.
"""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefalign.errors import ModelError
from prefalign.models.export import export
from prefalign.models.load import add_lora, load_model, load_tokenizer, save_model
from prefalign.models.merge import merged
from prefalign.models.tiny import save_tiny

SHIPPED = "src/prefalign/assets/imdb-lm"
TEXTS = ["I loved the movie, 10/10 and 2024!", "  two spaces\n\nnew lines <|im_end|> after", "café 😀 naïve"]
F32 = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """arch -> tiny model folder with weights large enough that attention is far from uniform."""
    root = tmp_path_factory.mktemp("export-models")
    # qwen2: transformers loads Qwen2's own tokenizer class for it, which adds <|endoftext|> as id 400; the
    # embedding has spare rows for it, as real Qwen2 checkpoints do (GGUF names unused rows [PAD<id>])
    # (folders named tiny-*: transformers' GGUF reader mistakes a llama file whose general.name is exactly
    # "mistral" for its own mistral type, which gguf-py does not know, and fails)
    return {arch: save_tiny(root / f"tiny-{arch}", arch, tokenizer, hidden=32, initializer_range=0.3,
                            vocab_size=416 if arch == "qwen2" else None)
            for arch in ("llama", "qwen2", "mistral", "gpt2", "mamba")}


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0]


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _trained_lora(base, final, seed: int) -> None:
    """A LoRA run's final/ as training saves it, with non-zero B (as after training) so the merge matters."""
    torch.manual_seed(seed)
    model = add_lora(load_model(base), {"r": 4})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_model(model, load_tokenizer(base), final, base=base)


@pytest.fixture(scope="module")
def lora_final(models, tmp_path_factory):
    """A LoRA run's final/ as training saves it: an adapter on the tiny llama, with non-zero B (trained)."""
    base = models["llama"]
    final = tmp_path_factory.mktemp("run") / "final"
    _trained_lora(base, final, seed=1)
    return final


def _in_process(final, base):
    """The model prefalign trains and evaluates: the base with the adapter applied, not merged."""
    return PeftModel.from_pretrained(load_model(base), str(final)).eval()


def test_hf_export_of_a_lora_run_loads_in_plain_transformers(lora_final, models, tokenizer, tmp_path):
    out = tmp_path / "hf"
    run = subprocess.run([sys.executable, "-m", "prefalign", "export", str(lora_final), "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, trust_remote_code=False)
    expected = _logits(_in_process(lora_final, models["llama"]), tokenizer)
    assert _gap(_logits(plain, tokenizer), expected) < F32
    base = _logits(AutoModelForCausalLM.from_pretrained(models["llama"]), tokenizer)
    assert _gap(base, expected) > 0.1  # the adapter changes the model: an export of the base alone would fail
    # the tokenizer and chat template round-trip; servers stop on generation_config's eos
    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert [reloaded(t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert merged(lora_final)[0].dtype == torch.float32  # B·A added to W in fp32


@pytest.mark.parametrize("rope", [{"rope_theta": 1e6, "rope_type": "default"},
                                  {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}], ids=["1e6", "linear"])
def test_hf_export_writes_the_keys_transformers_4_reads(rope, tokenizer, tmp_path):
    """transformers 4.x (vLLM installs often pin it) reads rope_theta/rope_scaling/torch_dtype, not 5.x's
    rope_parameters/dtype, and has no TokenizersBackend class: without these keys it runs RoPE at theta 10000
    and cannot load the tokenizer (benchmarks/hf_export_tf4_check.py loads exports under 4.57: logits equal)."""
    source = save_tiny(tmp_path / "src", "llama", tokenizer, hidden=32, initializer_range=0.3,
                       rope_parameters=dict(rope))
    out = export(source, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == rope["rope_theta"] and config["torch_dtype"] == config["dtype"] == "float32"
    scaled = rope["rope_type"] != "default"
    assert config.get("rope_scaling") == ({"rope_type": "linear", "factor": 2.0} if scaled else None)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["chat_template"] == tokenizer.chat_template  # where every version looks for it
    # and transformers 5 reads the folder back as trained
    assert AutoConfig.from_pretrained(out).rope_parameters == AutoConfig.from_pretrained(source).rope_parameters
    reloaded = AutoTokenizer.from_pretrained(out)
    assert [reloaded(t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]
    assert _gap(_logits(AutoModelForCausalLM.from_pretrained(out), tokenizer),
                _logits(load_model(source), tokenizer)) == 0.0


def test_hf_export_of_a_full_fine_tune_in_bfloat16(models, tokenizer, tmp_path):
    out = export(models["qwen2"], tmp_path / "hf", "hf", "bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    source = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.bfloat16)
    assert plain.dtype == torch.bfloat16
    assert _gap(_logits(plain, tokenizer), _logits(source, tokenizer)) == 0.0  # the same bf16 weights
    # a bf16 full fine-tune has nothing to merge: it loads as bf16, not upcast to twice the memory
    assert merged(out)[0].dtype == torch.bfloat16


def _gguf_model(path):
    return load_model(path), load_tokenizer(path)  # prefalign's own GGUF path: transformers' GGUF reader


def test_gguf_round_trip_of_the_shipped_model(tmp_path):
    path = export(SHIPPED, tmp_path / "gguf", "gguf")  # auto: the shipped weights are fp32
    assert path.name == "model-f32.gguf"
    reader = gguf.GGUFReader(path)
    meta = {k: reader.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model",
                                                      "tokenizer.ggml.pre", "llama.rope.dimension_count",
                                                      "tokenizer.ggml.add_bos_token", "llama.context_length")}
    assert meta == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                    "llama.rope.dimension_count": 64, "tokenizer.ggml.add_bos_token": False,
                    "llama.context_length": 1024}
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    model, tok = _gguf_model(path)
    source_tok = load_tokenizer(SHIPPED)
    assert [tok(t)["input_ids"] for t in TEXTS] == [source_tok(t)["input_ids"] for t in TEXTS]
    assert _gap(_logits(model, source_tok), _logits(load_model(SHIPPED), source_tok)) < F32


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "mamba"])
def test_gguf_round_trip_of_each_architecture(arch, models, tokenizer, tmp_path):
    path = export(models[arch], tmp_path, "gguf", "float32")
    model, tok = _gguf_model(path)
    assert type(model).__name__ == AutoConfig.from_pretrained(models[arch]).architectures[0].replace(
        "Mistral", "Llama")  # llama.cpp runs Mistral as llama, and so it comes back
    assert _gap(_logits(model, tokenizer), _logits(load_model(models[arch]), tokenizer)) < F32
    assert [tok(t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]
    assert tok.chat_template == tokenizer.chat_template
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    # transformers gives a qwen2 folder Qwen2's own tokenizer class, which splits by Qwen2's regex
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if arch == "qwen2" else "gpt-2")
    types = dict(zip(reader.fields["tokenizer.ggml.tokens"].contents(), reader.fields["tokenizer.ggml.token_type"]
                     .contents(), strict=True))
    assert types["<|im_end|>"] == gguf.TokenType.CONTROL and types["the"] == gguf.TokenType.NORMAL


def test_gguf_of_a_lora_run_is_the_adapted_model(lora_final, models, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app

    run = CliRunner().invoke(app, ["export", str(lora_final), "-o", str(tmp_path), "--format", "gguf",
                                   "--dtype", "float32"])
    assert run.exit_code == 0, run.output
    model, _ = _gguf_model(tmp_path / "model-f32.gguf")
    assert _gap(_logits(model, tokenizer), _logits(_in_process(lora_final, models["llama"]), tokenizer)) < F32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gguf_half_types_round_only_what_llama_cpp_rounds(dtype, models, tokenizer, tmp_path):
    """F16/BF16: the matrices are rounded, norms and 1-D tensors stay F32. The same rounding applied to the
    source model in process gives the same logits, so nothing else changed."""
    path = export(models["llama"], tmp_path, "gguf", dtype)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    half = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == half
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    source = load_model(models["llama"])
    with torch.no_grad():
        for p in source.parameters():
            if p.ndim == 2:
                p.copy_(p.to(getattr(torch, dtype)).float())
    model, _ = _gguf_model(path)
    assert _gap(_logits(model, tokenizer), _logits(source, tokenizer)) < F32


def test_what_cannot_be_exported_is_refused_clearly(models, tokenizer, tmp_path):
    neox = tmp_path / "neox"
    AutoConfig.for_model("gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64, vocab_size=400).save_pretrained(neox)
    with pytest.raises(ModelError, match=r"does not support gpt_neox \(GPTNeoXForCausalLM\).*llama, mistral, qwen2"):
        export(neox, tmp_path / "o1", "gguf")
    scaled = tmp_path / "scaled"
    save_tiny(scaled, "llama", tokenizer, hidden=32, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ModelError, match="RoPE scaling 'linear'"):
        export(scaled, tmp_path / "o2", "gguf")
    with pytest.raises(ModelError, match="--format onnx: choose one of hf, gguf"):
        export(models["llama"], tmp_path / "o3", "onnx")
    with pytest.raises(ModelError, match="is the model being exported"):
        export(models["llama"], models["llama"], "hf")
    export(models["gpt2"], tmp_path / "o4", "hf")
    with pytest.raises(ModelError, match="already holds a model"):
        export(models["gpt2"], tmp_path / "o4", "hf")
    reward = tmp_path / "reward"
    AutoConfig.for_model("llama", architectures=["LlamaForSequenceClassification"]).save_pretrained(reward)
    with pytest.raises(ModelError, match="not a causal LM"):
        export(reward, tmp_path / "o5", "hf")
    missing = tmp_path / "nope" / "final"  # a typo
    with pytest.raises(ModelError, match=f"^no such folder: {missing}$"):
        export(missing, tmp_path / "o6", "gguf")
    # a Hub id is looked up in the cache (the tests are offline: docs/hub.md); tests/test_hub.py has the rest
    with pytest.raises(ModelError, match="^prefalign-tests/absent: no such local path, .* not in the cache"):
        export("prefalign-tests/absent", tmp_path / "o6", "gguf")


def test_gguf_refusals_come_before_the_weights_are_loaded(tokenizer, tmp_path):
    """A 7B model takes minutes and 28 GB to load: what cannot be written is refused from its config and
    tokenizer first. These folders have no weights, so loading would fail with another error."""
    from transformers import LlamaTokenizer

    def weightless(name, arch, tok, **kw):
        folder = save_tiny(tmp_path / name, arch, tok, hidden=32, **kw)
        (folder / "model.safetensors").unlink()
        return folder

    # Llama-2/Mistral's SentencePiece-style BPE (Metaspace, byte fallback), as transformers builds it
    sentencepiece = LlamaTokenizer(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "▁a": 5},
                                   merges=[("▁", "a")])
    for folder, why in [(weightless("sp", "llama", sentencepiece), "byte-level BPE .*SentencePiece-style"),
                        (weightless("mamba", "mamba", tokenizer, use_conv_bias=False), "use_conv_bias=false"),
                        (weightless("gpt2", "gpt2", tokenizer, scale_attn_weights=False), "scale_attn_weights=false"),
                        (weightless("short", "llama", tokenizer, vocab_size=300), "ids up to 399 but .* 300 rows")]:
        with pytest.raises(ModelError, match=why):
            export(folder, tmp_path / f"out-{folder.name}", "gguf")


def test_a_tokenizer_without_bos_gets_config_bos_as_llama_cpp_converter_does(tokenizer, tmp_path):
    """Qwen2.5's tokenizer has no bos_token; without tokenizer.ggml.bos_token_id llama.cpp would take id 11.
    Its converter falls back to config.json's bos_token_id, and so does export."""
    source = save_tiny(tmp_path / "tiny-nobos", "llama", tokenizer, hidden=32)
    no_bos = load_tokenizer(source)
    no_bos.bos_token = None
    no_bos.save_pretrained(source)
    assert load_tokenizer(source).bos_token_id is None
    reader = gguf.GGUFReader(export(source, tmp_path / "out", "gguf"))
    config = json.loads((source / "config.json").read_text())
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == config["bos_token_id"] == 1
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id != config["bos_token_id"]


def test_gguf_tensors_have_llama_cpp_shapes(models, tmp_path):
    """ggml's shapes are the reverse of numpy's: a Linear (out, in) is {in, out}; GPT-2's Conv1D (in, out)
    must be transposed to get there, Mamba's conv1d squeezed to {kernel, d_inner}."""
    gpt2 = {t.name: list(t.shape) for t in gguf.GGUFReader(export(models["gpt2"], tmp_path / "g", "gguf")).tensors}
    assert gpt2["blk.0.attn_qkv.weight"] == [32, 96] and gpt2["blk.0.ffn_up.weight"] == [32, 128]
    mamba = gguf.GGUFReader(export(models["mamba"], tmp_path / "m", "gguf"))
    shapes = {t.name: list(t.shape) for t in mamba.tensors}
    assert shapes["blk.0.ssm_conv1d.weight"] == [4, 64] and shapes["blk.0.ssm_a"] == [8, 64]
    a = next(t for t in mamba.tensors if t.name == "blk.0.ssm_a")
    assert np.all(np.asarray(a.data) < 0)  # A = -exp(A_log), what llama.cpp's scan multiplies by


def test_mistral_context_is_capped_at_its_sliding_window(tokenizer, tmp_path):
    """llama.cpp runs Mistral as llama, attending to the whole context: inside the window the two agree."""
    save_tiny(tmp_path / "tiny-mistral", "mistral", tokenizer, hidden=32, sliding_window=16)
    reader = gguf.GGUFReader(export(tmp_path / "tiny-mistral", tmp_path / "out", "gguf"))
    assert reader.fields["llama.context_length"].contents() == 16


def test_a_lora_run_on_a_gguf_base_exports_dequantised(models, tokenizer, tmp_path):
    """`model: FILE.gguf` trains LoRA on the dequantised weights; its export drops transformers' GGUF quantizer
    (save_pretrained refuses while it is attached) and writes the plain fp32 model."""
    base = export(models["llama"], tmp_path / "base", "gguf")
    _trained_lora(base, tmp_path / "final", seed=2)
    plain = AutoModelForCausalLM.from_pretrained(export(tmp_path / "final", tmp_path / "hf", "hf"))
    assert plain.dtype == torch.float32
    assert _gap(_logits(plain, tokenizer), _logits(_in_process(tmp_path / "final", base), tokenizer)) < F32


def test_pre_tokenizers_are_named_as_llama_cpp_names_them(tmp_path):
    """How the text is split before BPE, read from the tokenizer's structure; anything else is refused."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from prefalign.models.to_gguf import _pre_tokenizer

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    bare = dict(gpt2, use_regex=False)
    split = {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False}
    assert _pre_tokenizer(gpt2, "t") == "gpt-2"
    assert _pre_tokenizer({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                  gpt2]}, "t") == "smollm"
    assert _pre_tokenizer({"type": "Sequence", "pretokenizers": [split, bare]}, "t") == "qwen2"
    for other in (dict(gpt2, add_prefix_space=True), {"type": "Metaspace", "replacement": "▁"},
                  {"type": "Sequence", "pretokenizers": [dict(split, pattern={"Regex": r"\s+"}), bare]}):
        with pytest.raises(ModelError, match="byte-level BPE tokenizers that llama.cpp splits the same way"):
            _pre_tokenizer(other, "t")
