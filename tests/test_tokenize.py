"""Prompt+completion tokenized together; the loss mask from the seam; BOS/EOS never doubled or missing."""

import pytest

from prefalign.data.records import PreferencePair
from prefalign.data.tokenize import Tokenized, tokenize, tokenize_pair, truncate


def test_seam_differs_from_separate_tokenization(tokenizer):
    prompt, completion = "Answer: ", "yes"
    separate = tokenizer(prompt, add_special_tokens=False)["input_ids"] + \
        tokenizer(completion, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    assert separate != joint  # the trap is real for this BPE tokenizer
    t = tokenize(tokenizer, prompt, completion, add_eos=False)
    assert t.input_ids == joint
    # the straddling token " yes" carries completion characters: it is scored
    assert tokenizer.decode(t.input_ids[t.prompt_len:]) == " yes"
    assert tokenizer.decode(t.input_ids[:t.prompt_len]) == "Answer:"


def test_mask_boundary_on_plain_seam(tokenizer):
    t = tokenize(tokenizer, "Human: hi\n\nAssistant:", " hello", add_eos=False)
    assert tokenizer.decode(t.input_ids[:t.prompt_len]) == "Human: hi\n\nAssistant:"
    assert tokenizer.decode(t.input_ids[t.prompt_len:]) == " hello"


def test_eos_appended_once(tokenizer):
    t = tokenize(tokenizer, "Question: what?", " yes")
    assert t.input_ids[-1] == tokenizer.eos_token_id
    assert t.input_ids.count(tokenizer.eos_token_id) == 1
    t2 = tokenize(tokenizer, "Question: what?", " yes" + tokenizer.eos_token)
    assert t2.input_ids.count(tokenizer.eos_token_id) == 1


def test_bos_once_for_plain_text_and_chat_template(bos_tokenizer):
    tok = bos_tokenizer
    t = tokenize(tok, "the movie", " was good")
    assert t.input_ids[0] == tok.bos_token_id and t.input_ids.count(tok.bos_token_id) == 1
    # a template that writes BOS itself: tokenizing its text must not add another
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    try:
        msgs = [{"role": "user", "content": "hello"}]
        t = tokenize(tok, msgs, [{"role": "assistant", "content": "the movie was good"}])
        assert t.input_ids[0] == tok.bos_token_id and t.input_ids.count(tok.bos_token_id) == 1
    finally:
        tok.chat_template = tok.chat_template.removeprefix("{{ bos_token }}")


def test_chat_template_boundary_and_eos_from_template(tokenizer):
    msgs = [{"role": "user", "content": "hello"}]
    t = tokenize(tokenizer, msgs, [{"role": "assistant", "content": "the movie was good"}])
    assert tokenizer.decode(t.input_ids[:t.prompt_len]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(t.input_ids[t.prompt_len:]) == "the movie was good<|im_end|>\n"
    # the template's <|im_end|> is the EOS: no second one appended
    assert t.input_ids.count(tokenizer.eos_token_id) == 2  # user turn + assistant turn


def test_truncation_keeps_prompt_end_and_completion_start(bos_tokenizer):
    t = Tokenized(input_ids=[1, 10, 11, 12, 13, 14, 20, 21, 22, 23], prompt_len=6)
    cut = truncate(t, max_length=6, max_prompt_length=3, bos=1)
    assert cut.input_ids == [1, 13, 14, 20, 21, 22] and cut.prompt_len == 3 and cut.truncated
    assert truncate(t, max_length=20, max_prompt_length=3, bos=1) is t
    pair = PreferencePair("the movie " * 30, " was good", " was bad")
    chosen, rejected = tokenize_pair(bos_tokenizer, pair, max_length=16, max_prompt_length=8)
    for s in (chosen, rejected):
        assert len(s.input_ids) <= 16 and s.prompt_len == 8 and s.truncated
        assert s.input_ids[0] == bos_tokenizer.bos_token_id


def test_batches_are_truncated_then_padded_to_their_longest(tokenizer):
    from prefalign.data.batches import Example, collate, collate_shared_prompt

    pairs = [PreferencePair("the movie " * 40, " was good.", " was bad."), PreferencePair("plot", " yes", " no")]
    examples = [Example(tokenize_pair(tokenizer, p, max_length=24, max_prompt_length=16)) for p in pairs]
    padded = collate(examples, [0, 1], tokenizer.pad_token_id)
    longest = max(len(s.input_ids) for e in examples for s in e.seqs)
    assert longest <= 24 and padded["input_ids"].shape[1] == longest  # never a global max_length
    shared = collate_shared_prompt(examples, [0, 1], tokenizer.pad_token_id)
    assert shared["input_ids"].shape[1] < 2 * longest


@pytest.mark.parametrize("name", ["tokenizer", "bos_tokenizer"])
def test_bos_written_in_the_data_is_kept(name, request):
    """make faults found `<s><s>` in the data losing one `<s>` (the tokenizer adds none: `tokenizer`), and an
    empty prompt before an answer `<s>` giving a prompt length of -1. Only a BOS the tokenizer added is dropped,
    and only in front of a prompt that already starts with one."""
    tok = request.getfixturevalue(name)
    for prompt, answer in (("", "<s><s>"), ("<s><s>", "y"), ("", "<s>"), ("<s>", "<s>")):
        t = tokenize(tok, prompt, answer, add_eos=False)
        added = tok.bos_token if name == "bos_tokenizer" and not prompt.startswith("<s>") else ""
        assert tok.decode(t.input_ids) == added + prompt + answer
        assert 0 <= t.prompt_len < len(t.input_ids) and tok.decode(t.input_ids[t.prompt_len:]) == answer
    t = tokenize(tok, "<s>the movie", " was good")
    assert t.input_ids.count(tok.bos_token_id) == 1
