"""Tiny tokenizers and models built from scratch, for tests and benchmarks: nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterable

# ChatML, as SmolLM2/Qwen write it: the assistant turn ends with <|im_end|>, the EOS token.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, bos: bool = False, chat: bool = True):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`, as a transformers fast tokenizer.

    bos=True makes it prepend <s> like Llama tokenizers do, to exercise BOS handling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>" if chat else "</s>")
    if chat:
        fast.chat_template = CHATML
    return fast
