"""Chat templates and multi-turn masks (data/chat.py): the `chat_template` option, token-exact masks of
every assistant turn with real templates (SmolLM2's, shipped ones, a file), and multi-turn SFT.

Expected masks are built by hand: the rendered text written out piece by piece (header, then the turn),
each piece tokenized on its own and marked trained or not. Pieces end at special tokens or newlines, so
tokenizing them one by one gives the same ids as tokenizing the whole text (asserted)."""

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from prefalign.data.chat import GENERATION, TEMPLATES, TokenizationError, conversation_mask, resolve_chat_template
from prefalign.data.tokenize import tokenize
from prefalign.errors import ConfigError
from prefalign.models.load import load_tokenizer, load_tokenizer_for

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "src" / "prefalign" / "assets" / "imdb-lm"
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's own

SYSTEM = {"role": "system", "content": "You are terse."}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
CALL_JSON = '{"name": "weather", "arguments": {"city": "Paris"}}'
RESULT = {"role": "tool", "content": '{"temp_c": 21}'}
ANSWER = {"role": "assistant", "content": "It is 21 C in Paris."}
AGAIN = {"role": "user", "content": "And tomorrow?"}
LAST = {"role": "assistant", "content": "Rain, 17 C."}
CONVERSATION = [SYSTEM, ASK, CALL, RESULT, ANSWER, AGAIN, LAST]
# for templates that never read tool_calls (SmolLM2's): the call written as the turn's text
CONVERSATION_TEXT = [SYSTEM, ASK, {"role": "assistant", "content": 'weather(city="Paris")'}, RESULT, ANSWER, AGAIN,
                     LAST]


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer and chat template (tests/fixtures/smollm2-tokenizer/SOURCE.json)."""
    folder = tmp_path_factory.mktemp("smollm2")
    for f in (HERE / "fixtures" / "smollm2-tokenizer").iterdir():
        if f.suffix == ".gz":
            (folder / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
        else:
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def smol(smol_folder):
    return load_tokenizer(smol_folder)


@pytest.fixture(scope="module")
def smol_tokens(smol_folder):
    """SmolLM2's tokens with whatever template a test sets on it (loaded once: the tests set it first)."""
    return load_tokenizer(smol_folder)


def expect(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids, mask = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    whole = tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]
    assert ids == whole, "the pieces do not tokenize on their own as in the whole text: fix the test's pieces"
    return ids, mask


def turns(messages, trained: set[int], header, body) -> list[tuple[str, bool]]:
    """Hand-written rendering: header(message) untrained, then body(message) trained when its index is."""
    return [p for i, m in enumerate(messages) for p in ((header(m), False), (body(m), i in trained))]


def chatml_turns(messages, trained):
    return turns(messages, trained, lambda m: f"<|im_start|>{m['role']}\n", lambda m: m["content"] + "<|im_end|>\n")


def check(tokenizer, pieces, t) -> None:
    ids, mask = expect(tokenizer, pieces)
    assert t.input_ids == ids
    assert t.loss_mask == mask
    assert t.prompt_len == mask.index(True)


# ---------------------------------------------------------------- SmolLM2's real template


def test_smollm2_template_masks_every_assistant_turn_token_exactly(smol):
    """No system message: SmolLM2's template writes its own; a tool call written as text (its template
    never reads tool_calls) and the tool's result; three assistant turns."""
    call = {"role": "assistant", "content": 'weather(city="Paris")'}
    conv = [ASK, call, RESULT, ANSWER, AGAIN, LAST]
    system = [(f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n", False)]
    assert smol.apply_chat_template(conv, tokenize=False) == "".join(p for p, _ in system + chatml_turns(conv, set()))
    t = tokenize(smol, conv[:-1], conv[-1:], all_turns=True)
    check(smol, system + chatml_turns(conv, {1, 3, 5}), t)
    runs = smol.decode([i for i, on in zip(t.input_ids, t.loss_mask, strict=True) if on])
    assert runs == 'weather(city="Paris")<|im_end|>\nIt is 21 C in Paris.<|im_end|>\nRain, 17 C.<|im_end|>\n'
    # the last turn only (the default): the earlier turns are context
    check(smol, system + chatml_turns(conv, {5}), tokenize(smol, conv[:-1], conv[-1:]))
    # with a system prompt of its own, the template writes no default one
    conv = [SYSTEM, *conv]
    check(smol, chatml_turns(conv, {2, 4, 6}), tokenize(smol, conv[:-1], conv[-1:], all_turns=True))


def test_a_template_that_ignores_tool_calls_is_an_error_not_a_silent_drop(smol):
    with pytest.raises(ConfigError, match="tool_calls.*chat_template"):
        tokenize(smol, CONVERSATION[:-1], CONVERSATION[-1:], all_turns=True)


def test_preference_rows_with_multi_turn_prompts_score_only_the_answer(smol):
    prompt = [SYSTEM, ASK, {"role": "assistant", "content": 'weather(city="Paris")'}, RESULT]
    chosen, rejected = [ANSWER], [{"role": "assistant", "content": "No idea."}]
    for answer in (chosen, rejected):
        check(smol, chatml_turns(prompt + answer, {4}), tokenize(smol, prompt, answer))


def test_llamafactory_sharegpt_demonstrations_with_function_calls(smol, tmp_path):
    """LLaMA-Factory's SFT shape: function_call turns are the assistant's (trained), observations are tool
    results (not trained)."""
    from prefalign.data import load_records

    row = {"system": "You are terse.", "conversations": [
        {"from": "human", "value": ASK["content"]}, {"from": "function_call", "value": CALL_JSON},
        {"from": "observation", "value": RESULT["content"]}, {"from": "gpt", "value": ANSWER["content"]}]}
    (tmp_path / "sft.json").write_text(json.dumps([row]))
    (record,), problems = load_records(tmp_path / "sft.json")
    assert problems == [] and record.label and record.completion == [ANSWER]
    conv = [SYSTEM, ASK, {"role": "assistant", "content": CALL_JSON}, RESULT, ANSWER]
    assert record.prompt + record.completion == conv
    check(smol, chatml_turns(conv, {2, 4}), tokenize(smol, record.prompt, record.completion, all_turns=True))


def test_tool_calls_are_checked_and_kept(tmp_path):
    from prefalign.data import load_records

    openai_null = {**CALL, "content": None}
    rows = [{"messages": [ASK, openai_null, {**RESULT, "tool_call_id": "call_1"}, ANSWER]},
            {"messages": [{**ASK, "tool_calls": CALL["tool_calls"]}, ANSWER]},
            {"messages": [ASK, {**CALL, "tool_calls": [{"function": {"arguments": {}}}]}, RESULT, ANSWER]}]
    records, problems = load_records(write_jsonl(tmp_path / "calls.jsonl", rows))
    assert records[0].prompt[1] == CALL and records[0].prompt[2]["tool_call_id"] == "call_1"
    assert [(p.field, p.kind) for p in problems] == [("messages[0].tool_calls", "roles"),
                                                     ("messages[1].tool_calls[0]", "type")]


# ---------------------------------------------------------------- the shipped model, a name, a file


def test_shipped_model_has_no_template_the_error_names_the_option():
    from prefalign.models.generate import encode_prompt

    tok = load_tokenizer(SHIPPED)
    assert not tok.chat_template
    with pytest.raises(ConfigError, match="chat_template"):
        tokenize(tok, [ASK], [ANSWER])
    with pytest.raises(ConfigError, match="chat_template"):
        encode_prompt(tok, [ASK])  # sampling (RL, sample, eval, the KL monitor) too
    assert tokenize(tok, "The movie", " was good.").completion_len > 0  # plain text needs none


def test_sampling_reads_the_option_too(tmp_path):
    from prefalign.feedback.sample import SampleConfig, sample

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [SYSTEM, ASK]}])
    sample(SampleConfig(model=str(SHIPPED), prompts=str(prompts), output=str(tmp_path / "s.jsonl"), n=1,
                        max_new_tokens=3, chat_template="zephyr"), log=lambda _: None)  # without it: the error above
    assert len(json.loads((tmp_path / "s.jsonl").read_text())["completions"]) == 1


def test_shipped_model_with_a_named_template_masks_tool_calls_token_exactly():
    tok = load_tokenizer_for(SHIPPED, chat_template="zephyr")
    assert tok.chat_template == (TEMPLATES / "zephyr.jinja").read_text()
    eos = tok.eos_token  # <|endoftext|>: zephyr ends each turn with the tokenizer's own EOS

    def body(m):
        calls = "".join(f"<tool_call>\n{CALL_JSON}\n</tool_call>" for _ in m.get("tool_calls", []))
        return m["content"] + calls + eos + "\n"

    t = tokenize(tok, CONVERSATION[:-1], CONVERSATION[-1:], all_turns=True)
    check(tok, turns(CONVERSATION, {2, 4, 6}, lambda m: f"<|{m['role']}|>\n", body), t)
    check(tok, turns(CONVERSATION, {6}, lambda m: f"<|{m['role']}|>\n", body),
          tokenize(tok, CONVERSATION[:-1], CONVERSATION[-1:]))


def _chatml_body(m) -> str:
    """An assistant turn as the shipped chatml writes it after its header (one call per tool call here)."""
    calls = "".join(f"<tool_call>\n{CALL_JSON}\n</tool_call>" for _ in m.get("tool_calls", []))
    return m["content"] + calls + "<|im_end|>\n"


def test_chatml_by_name_on_smollm2_tokens_renders_tool_calls(smol_tokens):
    tok = smol_tokens
    tok.chat_template = resolve_chat_template("chatml")
    t = tokenize(tok, CONVERSATION[:-1], CONVERSATION[-1:], all_turns=True)
    check(tok, turns(CONVERSATION, {2, 4, 6}, lambda m: f"<|im_start|>{m['role']}\n", _chatml_body), t)


def test_a_template_file_overrides_the_tokenizers_own(tiny_models, tmp_path):
    """A file without {% generation %} blocks (masks by prefix differences) and without an end-of-turn
    token (EOS is appended to the last turn) replaces the tiny model's ChatML."""
    path = tmp_path / "hashes.jinja"
    path.write_text("{%- for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{%- endfor %}"
                    "{%- if add_generation_prompt %}{{ '### assistant:\\n' }}{%- endif %}")
    tok = load_tokenizer_for(tiny_models["llama"], chat_template=str(path))
    conv = [SYSTEM, ASK, {"role": "assistant", "content": "Let me look."}, AGAIN, LAST]
    t = tokenize(tok, conv[:-1], conv[-1:], all_turns=True)
    pieces = turns(conv, {2, 4}, lambda m: f"### {m['role']}:\n", lambda m: m["content"] + "\n")
    ids, mask = expect(tok, pieces)
    assert t.input_ids == ids + [tok.eos_token_id] and t.loss_mask == mask + [True]


def test_names_and_files_are_told_apart(tmp_path, monkeypatch):
    assert {p.stem for p in TEMPLATES.glob("*.jinja")} == {"chatml", "zephyr", "llama3"}
    assert resolve_chat_template("llama3") == (TEMPLATES / "llama3.jinja").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatml").write_text("a file named like a template")
    assert resolve_chat_template("chatml") == (TEMPLATES / "chatml.jinja").read_text()  # a bare name wins
    assert resolve_chat_template("./chatml") == "a file named like a template"
    with pytest.raises(ConfigError, match="neither a shipped template .*chatml, llama3, zephyr"):
        resolve_chat_template("chatlm")
    with pytest.raises(ConfigError, match="nope.jinja.*neither"):
        resolve_chat_template("nope.jinja")
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_chat_template("empty.jinja")


# ---------------------------------------------------------------- the two ways of finding the turns


@pytest.mark.parametrize("name", ["chatml", "zephyr", "llama3"])
def test_generation_blocks_and_prefix_differences_agree(name, smol_tokens):
    """Each shipped template marks its turns with {% generation %}; with the blocks removed, the masks
    come from prefix differences: the same tokens either way."""
    tok = smol_tokens
    with_blocks = resolve_chat_template(name)
    without = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", with_blocks)
    assert GENERATION.search(with_blocks) and not GENERATION.search(without)
    for first in (0, 4):
        tok.chat_template = with_blocks
        a = conversation_mask(tok, CONVERSATION, first)
        tok.chat_template = without
        assert conversation_mask(tok, CONVERSATION, first) == a and sum(a[1]) > 0


def test_chatml_by_name_equals_smollm2_own_template_given_a_system_prompt(smol, smol_tokens):
    conv = [SYSTEM, ASK, ANSWER, AGAIN, LAST]
    smol_tokens.chat_template = resolve_chat_template("chatml")
    assert conversation_mask(smol_tokens, conv, 0) == conversation_mask(smol, conv, 0)


def test_a_template_that_rewrites_earlier_turns_is_refused_for_all_turns(smol_tokens):
    tok = smol_tokens
    # like templates that drop the reasoning of earlier answers: earlier assistant turns are not kept as written
    tok.chat_template = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{%- if m['role'] != "
                         "'assistant' or loop.last %}{{ m['content'] }}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
    conv = [ASK, ANSWER, AGAIN, LAST]
    with pytest.raises(TokenizationError, match=r"messages\[1\].*rewrites earlier turns.*assistant_turns: last"):
        tokenize(tok, conv[:-1], conv[-1:], all_turns=True)
    assert tok.decode(tokenize(tok, conv[:-1], conv[-1:]).input_ids).endswith("Rain, 17 C.<|im_end|>\n")


# ---------------------------------------------------------------- the layouts and SFT


def test_every_layout_scores_the_same_tokens_of_multi_turn_answers(tiny_models, tokenizer):
    """Answers that call a tool, read its result and answer: the result inside the answer is not scored,
    in padded, shared-prompt and packed rows alike (log-probs equal)."""
    from prefalign.data.batches import Example, collate, collate_packed, collate_shared_prompt
    from prefalign.models.load import load_model
    from prefalign.models.logps import batch_logps

    tok = load_tokenizer_for(tiny_models["llama"], chat_template="chatml")
    model = load_model(tiny_models["llama"]).eval()
    examples = [Example((tokenize(tok, [SYSTEM, ASK], [CALL, RESULT, ANSWER]), tokenize(tok, [SYSTEM, ASK], [LAST]))),
                Example((tokenize(tok, [ASK], [ANSWER]), tokenize(tok, [ASK], [CALL, RESULT, LAST])))]
    gap = examples[0].seqs[0]
    unscored = [i for t, (i, on) in enumerate(zip(gap.input_ids, gap.loss_mask, strict=True))
                if t >= gap.prompt_len and not on]
    assert tok.decode(unscored) == '<|im_start|>tool\n{"temp_c": 21}<|im_end|>\n<|im_start|>assistant\n'
    with torch.no_grad():
        padded = batch_logps(model, collate(examples, [0, 1], tok.pad_token_id))
        for collate_fn in (collate_shared_prompt, collate_packed):
            batch = collate_fn(examples, [0, 1], tok.pad_token_id)
            assert torch.allclose(batch_logps(model, batch), padded, atol=1e-5)
            assert batch["lengths"].tolist() == [float(e.seqs[k].completion_len) for k in (0, 1) for e in examples]
    # a precomputed reference is keyed on which tokens are scored, not only on the ids
    from dataclasses import replace

    from prefalign.models.reference import fingerprint

    unmasked = Example((replace(gap, mask=None), *examples[0].seqs[1:]))
    assert fingerprint(model, [examples[0]]) != fingerprint(model, [unmasked])


def test_truncation_keeps_each_token_with_its_mask(smol):
    """A long multi-turn sequence cut to max_length: the prompt's end and the conversation's start are kept,
    and every kept token keeps its own mark."""
    from prefalign.data.tokenize import truncate

    full = tokenize(smol, CONVERSATION_TEXT[:-1], CONVERSATION_TEXT[-1:], all_turns=True)
    cut = truncate(full, max_length=17, max_prompt_length=5)
    assert cut.truncated and len(cut.input_ids) == 17 and cut.prompt_len == 5
    kept = list(range(full.prompt_len - 5, full.prompt_len + 12))
    assert cut.input_ids == [full.input_ids[t] for t in kept]
    assert cut.loss_mask == [full.loss_mask[t] for t in kept] and False in cut.loss_mask[5:]


def test_sft_trains_every_assistant_turn(tiny_models, tmp_path):
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    rows = [{"messages": CONVERSATION}, {"messages": [ASK, ANSWER, AGAIN, LAST]}] * 2
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    cfg = make_config(method="sft", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "run"),
                      max_steps=2, batch_size=4, assistant_turns="all", chat_template="chatml", kl_every=0)
    train(cfg, log=lambda _: None, progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tok = load_tokenizer_for(tiny_models["llama"], chat_template="chatml")
    trained = [sum(len(tok(_chatml_body(m), add_special_tokens=False)["input_ids"]) for m in r["messages"]
                   if m["role"] == "assistant") for r in rows]  # every assistant turn, by hand
    assert len(metrics) == 2 and metrics[0]["sft/tokens"] == pytest.approx(sum(trained) / len(trained))
    # the run's final/ carries the template it was trained with
    assert load_tokenizer(tmp_path / "run" / "final").chat_template == (TEMPLATES / "chatml.jinja").read_text()
    with pytest.raises(ConfigError, match="'assistant_turns' is a key of sft, not of dpo"):
        make_config(method="dpo", model="m", data="d", output="o", assistant_turns="all")
