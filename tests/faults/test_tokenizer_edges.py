"""Tokenizer edge cases (data/tokenize.py, data/chat.py) with the test tokenizers (tests/conftest.py),
SmolLM2's real tokenizer and template (tests/fixtures/smollm2-tokenizer) and shipped or hostile templates:
empty prompts and answers, prompts longer than max_length, answers made only of special tokens, emoji, RTL,
zero-width and combining characters, templates that trim content or drop the system turn. Then a 2-step
DPO run on a file made of them: it trains, finite, and every record it did not train on is listed with why.

What the code does (docs/data.md, docs/reliability.md "Fuzzed inputs"): a sequence always keeps at least
one scored token; truncation keeps the end of the prompt (and a leading BOS) and the start of the answer;
an empty answer trains EOS alone (and without EOS is a TokenizationError); special-token text in the data
is read as those tokens; the only other refusal is a template that renders no assistant tokens.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import re
import shutil
from pathlib import Path

import hypothesis.strategies as st
import pytest
from faultkit import tally
from fuzzkit import Runs, fuzz_settings
from hypothesis import given

from prefalign.data.chat import TokenizationError, resolve_chat_template
from prefalign.data.tokenize import tokenize
from prefalign.models.load import load_tokenizer

KIND = "tokenizer edge case"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# a template that trims every message and drops the system turn (as several model cards' templates do)
STRIP = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
         "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# one that writes no assistant text at all: nothing to train on, which must be said, not guessed
SILENT = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
PIECES = ["", " ", "\u200b", "\u200d", "\u202e", "\u200f", "e\u0301", "\u0301\u0301", "\U0001f600",
          "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",
          "\n", "\t", "<|im_end|>", "<|im_start|>", "</s>", "<s>", "<pad>", "<|endoftext|>", "a", "the movie",
          "yes " * 12]
TEXT = st.lists(st.sampled_from(PIECES), max_size=5).map("".join)


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2")
    for f in (FIXTURES / "smollm2-tokenizer").iterdir():
        if f.suffix == ".gz":
            (folder / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
        else:
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tokenizer, bos_tokenizer, smol_folder):
    """name -> tokenizer: the byte-level test tokenizers (ChatML with {% generation %}-free prefix masks),
    SmolLM2's own template, the shipped chatml (generation blocks) and the trimming template, on SmolLM2."""
    out = {"tiny": tokenizer, "tiny+bos": bos_tokenizer, "smollm2": load_tokenizer(smol_folder)}
    for name, template in (("chatml", resolve_chat_template("chatml")), ("strip", STRIP)):
        out[name] = copy.deepcopy(out["smollm2"])
        out[name].chat_template = template
    return out


def check(tok, prompt, completion, max_length, max_prompt_length, add_eos):
    """The invariants of one tokenized sequence, against the same sequence untruncated."""
    full = tokenize(tok, prompt, completion, add_eos=add_eos)
    t = tokenize(tok, prompt, completion, max_length=max_length, max_prompt_length=max_prompt_length, add_eos=add_eos)
    assert len(t.loss_mask) == len(t.input_ids) and t.prompt_len < len(t.input_ids)
    assert t.loss_mask[t.prompt_len] and t.completion_len >= 1, "a sequence with nothing to train on"
    if max_length is None or len(full.input_ids) <= max_length:
        assert (t.input_ids, t.prompt_len, t.truncated) == (full.input_ids, full.prompt_len, False)
        return full
    # a prompt that must be cut keeps max_prompt_length tokens (default max_length // 2), at most max_length - 1,
    # as TRL does: the sequence may end up shorter than max_length when the answer is short
    keep = min(max_prompt_length or max_length // 2, max_length - 1)
    assert t.truncated and t.prompt_len == min(keep, full.prompt_len)
    assert len(t.input_ids) == t.prompt_len + min(len(full.input_ids) - full.prompt_len, max_length - t.prompt_len)
    # the end of the prompt (after a kept BOS) and the start of the answer, token for token
    lead = 1 if tok.bos_token_id is not None and t.input_ids[0] == tok.bos_token_id == full.input_ids[0] \
        and t.prompt_len > 1 else 0
    tail = t.prompt_len - lead
    assert t.input_ids[lead:t.prompt_len] == full.input_ids[full.prompt_len - tail:full.prompt_len]
    assert t.input_ids[t.prompt_len:] == full.input_ids[full.prompt_len:][:max_length - t.prompt_len]
    assert t.loss_mask[t.prompt_len:] == full.loss_mask[full.prompt_len:][:max_length - t.prompt_len]
    return full


def test_edge_text_keeps_one_answer_token_and_loses_no_character(tokenizers):
    runs = Runs(KIND)

    @fuzz_settings(40, 1500)
    @given(st.sampled_from(sorted(tokenizers)), TEXT, TEXT, st.booleans(), st.booleans(), st.booleans(),
           st.one_of(st.none(), st.integers(2, 24)), st.one_of(st.none(), st.integers(1, 24)), st.booleans())
    def prop(name, prompt, answer, as_messages, system, add_eos, max_length, max_prompt_length, multi):
        with runs.example():
            tok = tokenizers[name]
            chat = as_messages or name in ("chatml", "strip")
            p = ([{"role": "system", "content": "be " + prompt}] * system + [{"role": "user", "content": prompt}]
                 + [{"role": "assistant", "content": prompt}, {"role": "user", "content": answer}] * multi) \
                if chat else prompt
            c = [{"role": "assistant", "content": answer}] if chat else answer
            try:
                full = check(tok, p, c, max_length, max_prompt_length, add_eos)
            except TokenizationError as e:  # the one refusal text can cause: nothing at all to train on
                assert not chat and answer == "" and not add_eos and "produced no tokens" in str(e)
                return
            scored = tok.decode([i for i, on in zip(full.input_ids, full.loss_mask, strict=True) if on])
            if not chat:  # byte-level BPE: every character of the text comes back, special-token text included
                text = tok.decode(full.input_ids)
                ends = [b + prompt + answer + e for b in ("", tok.bos_token or "") for e in ("", tok.eos_token)]
                assert text in ends
                assert answer in tok.decode(full.input_ids[full.prompt_len:]) and scored
            else:  # the assistant's text as the template wrote it (trimmed by the trimming template)
                assert (answer.strip() if name == "strip" else answer) in scored

    runs.run(prop)


def long_prompt(toks):  # far over max_length: BOS + the prompt's last tokens + the answer's first
    tok = toks["tiny+bos"]
    t = tokenize(tok, "the movie was " * 40, " good", max_length=8, max_prompt_length=6)
    assert t.truncated and t.input_ids[0] == tok.bos_token_id and t.prompt_len == 6 and len(t.input_ids) == 8
    t = tokenize(tok, "the movie was " * 40, " good", max_length=4, max_prompt_length=100)  # mpl >= max_length
    assert t.prompt_len == 3 and t.completion_len == 1


def empty_prompt_or_answer(toks):  # the whole answer scored; EOS alone, or refused without it
    tok = toks["tiny"]
    t = tokenize(tok, "", "yes")
    assert t.prompt_len == 0 and tok.decode(t.input_ids) == "yes" + tok.eos_token
    assert tokenize(tok, "hi", "").input_ids[-1] == tok.eos_token_id
    with pytest.raises(TokenizationError, match="no tokens"):
        tokenize(tok, "hi", "", add_eos=False)


def special_token_answers(toks):  # the EOS text is read as EOS, not doubled; a pad-token answer trains that token
    tok = toks["tiny"]
    t = tokenize(tok, "hi", tok.eos_token)
    assert t.input_ids[t.prompt_len:] == [tok.eos_token_id]
    assert tok.pad_token_id in tokenize(tok, "hi", "<pad>").input_ids[1:]


def trimming_template(toks):  # trims and drops the system turn: the trimmed answer and end of turn are scored
    strip = toks["strip"]
    msgs = [{"role": "system", "content": "SECRET"}, {"role": "user", "content": "  hi  "}]
    t = tokenize(strip, msgs, [{"role": "assistant", "content": "  \U0001f600 ok \u200b "}])
    assert "SECRET" not in strip.decode(t.input_ids)
    assert strip.decode(t.input_ids[t.prompt_len:]) == "\U0001f600 ok \u200b<|im_end|>\n"


def silent_template(toks):  # writes no assistant text: refused with the reason (training lists it as a problem)
    silent = copy.deepcopy(toks["strip"])
    silent.chat_template = SILENT
    with pytest.raises(TokenizationError, match="produced no tokens"):
        tokenize(silent, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "ok"}])


EDGES = [long_prompt, empty_prompt_or_answer, special_token_answers, trimming_template, silent_template]


@pytest.mark.parametrize("edge", EDGES, ids=[f.__name__ for f in EDGES])
def test_documented_edge(edge, tokenizers):
    """Each behaviour the module docstring states."""
    held = False
    try:
        edge(tokenizers)
        held = True
    finally:
        tally(KIND, survived=held, detail=edge.__name__)


EDGE_ROWS = [  # (row, trained?) for DPO at max_length 24, max_prompt_length 8
    ({"prompt": "the movie was " * 30, "chosen": " good", "rejected": " bad"}, True),  # prompt > max_length
    ({"prompt": "hi", "chosen": "<|im_end|>", "rejected": "</s></s>"}, True),  # answers of special tokens only
    ({"prompt": "\u05e9\u05dc\u05d5\u05dd \u202e", "chosen": "\U0001f468\u200d\U0001f469\u200d\U0001f467 e\u0301",
      "rejected": "\u0645\u0631\u062d\u0628\u0627 \u200f"}, True),  # RTL, emoji ZWJ sequence, combining
    ({"prompt": "yes " * 40, "chosen": "no " * 40, "rejected": "yes " * 40}, True),  # both over max_length
    ({"prompt": "", "chosen": "good", "rejected": "bad"}, False),  # empty prompt: not a pair (data check)
    ({"prompt": "hi", "chosen": "\u200b\u200d", "rejected": "bad"}, False),  # zero-width only: empty
    ({"prompt": "hi", "chosen": " ", "rejected": "bad"}, False),  # whitespace: empty
]
CHAT_ROWS = [  # a second source (a file has one shape): messages, trimmed and their system turn dropped
    ({"prompt": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "  \U0001f600  "}],
      "chosen": [{"role": "assistant", "content": " good "}],
      "rejected": [{"role": "assistant", "content": "<|im_start|>"}]}, True),
    ({"prompt": [{"role": "user", "content": "\u0645\u0631\u062d\u0628\u0627 " * 20}],
      "chosen": [{"role": "assistant", "content": "e\u0301\u0301"}],
      "rejected": [{"role": "assistant", "content": "</s>"}]}, True),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "\u200b"}],
      "rejected": [{"role": "assistant", "content": "no"}]}, False),
]


def test_two_steps_of_dpo_on_edge_cases(tokenizer, tmp_path):
    """A real 2-step DPO run on the rows above, through the trimming template: finite, and every row is
    either trained or in a problems file with its reason."""
    from prefalign.api import train
    from prefalign.models.tiny import save_tiny
    from prefalign.train.methods import make_config

    model = save_tiny(tmp_path / "llama", "llama", tokenizer, hidden=32)
    (tmp_path / "strip.jinja").write_text(STRIP)
    files = {tmp_path / "edges.jsonl": EDGE_ROWS, tmp_path / "chat.jsonl": CHAT_ROWS}
    for path, rows in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    cfg = make_config(method="dpo", model=str(model), data=[str(f) for f in files], output=str(tmp_path / "run"),
                      max_steps=2,
                      batch_size=2, max_length=24, max_prompt_length=8, kl_every=0, report_to=["none"],
                      chat_template=str(tmp_path / "strip.jinja"), learning_rate=1e-3, seed=0)
    lines, problems, held, ran = [], [], False, False
    try:  # tallied once the checks have decided, pass or fail: one run of the edge cases
        train(cfg, log=lines.append, progress=False)
        ran = True
        metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m) and len(metrics) >= 2, metrics
        problems = [json.loads(x) for x in (tmp_path / "run" / "data_problems.jsonl").read_text().splitlines()]
        assert sorted((p["file"], p["line"]) for p in problems) == sorted(
            (str(f), i) for f, rows in files.items() for i, (_, ok) in enumerate(rows, 1) if not ok)
        assert all(p["problem"] and p["raw"] for p in problems)
        for path, rows in files.items():  # trained: every other row, the long ones truncated (not dropped)
            assert any(f"{path}: {sum(ok for _, ok in rows)} examples" in line for line in lines), lines
        held = True
    finally:
        tally(KIND, survived=held, lost=unaccounted(files, problems, lines) if ran else 0)


def unaccounted(files: dict, problems: list[dict], lines: list[str]) -> int:
    """Rows a run neither trained on (its '<file>: N examples' line) nor listed in data_problems.jsonl."""
    n = 0
    for path, rows in files.items():
        said = [int(m.group(1)) for line in lines if (m := re.search(re.escape(f"{path}: ") + r"(\d+) examples", line))]
        n += max(0, len(rows) - (said[0] if said else 0) - sum(p["file"] == str(path) for p in problems))
    return n
