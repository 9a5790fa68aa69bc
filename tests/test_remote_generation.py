"""generation_backend: openai against a real `prefalign serve` on loopback (key from an environment
variable): sample and eval's sampling draw the same completions as the in-process hf backend under the
same seeds, and label's pairwise LM judge on the server gives the in-process judge's probabilities."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import write_jsonl  # noqa: E402
from prefalign.errors import ConfigError, ModelError  # noqa: E402
from test_serve import SHIPPED, free_port, start, stop  # noqa: E402

KEY = "remote-key"


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start([SHIPPED, "--api-key", KEY, "--threads", "1"], port)
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.fixture
def remote(server, monkeypatch):
    monkeypatch.setenv("PREFALIGN_TEST_KEY", KEY)
    return {"generation_backend": "openai", "base_url": server, "api_key_env": "PREFALIGN_TEST_KEY"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": p} for p in ("I loved this movie because", "The plot was", "Terrible acting and a",
                                    "My favourite scene", "This film")]
    return str(write_jsonl(tmp_path_factory.mktemp("p") / "prompts.jsonl", rows))


def test_sample_draws_what_the_in_process_backend_draws(prompts, remote, tmp_path):
    from prefalign.feedback.sample import SampleConfig, sample

    def run(name: str, **kw) -> list[dict]:
        out = tmp_path / f"{name}.jsonl"
        # batch_size 4 over 5 prompts x 2: batches of several prompts, repeated prompts, a ragged last batch
        sample(SampleConfig(model=SHIPPED, prompts=prompts, output=str(out), n=2, batch_size=4, max_new_tokens=24,
                            seed=5, threads=1, **kw), log=lambda _: None)
        return [json.loads(x) for x in out.read_text().splitlines()]

    for settings in ({}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 20}):
        here, there = run("hf", **settings), run("openai", **settings, **remote)
        assert here == there, settings
    assert any(not e for row in here for e in row["ended"]) and any(e for row in here for e in row["ended"])
    assert run("again", **remote) == run("openai", **remote)  # seeded: reproducible across calls


def test_eval_sampling_through_the_server(prompts, remote, tmp_path):
    from prefalign.eval.evaluate import EvalConfig, evaluate

    def run(name: str, **kw) -> tuple[dict, list[str]]:
        out = tmp_path / name
        res = evaluate(EvalConfig(model=SHIPPED, prompts=prompts, output=str(out), max_new_tokens=16, seed=2,
                                  threads=1, **kw), log=lambda _: None, progress=False)
        return res, (out / "samples.jsonl").read_text().splitlines()

    (here, here_samples), (there, there_samples) = run("hf"), run("openai", **remote)
    assert here_samples == there_samples
    assert here["entropy"] == pytest.approx(there["entropy"], abs=1e-6)


def test_label_with_the_pairwise_judge_on_the_server(remote, tmp_path):
    from prefalign.feedback.label import LabelConfig, label
    from prefalign.judges import PairwiseJudge

    rows = [{"prompt": "Was the film good?", "completions": ["Yes, I loved it.", "No, it was awful.", "Maybe."]},
            {"prompt": "The plot", "completions": ["was thin", "was a delight from start to end"]}]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)

    def run(name: str, **kw) -> list[dict]:
        out = tmp_path / f"{name}.jsonl"
        label(LabelConfig(samples=str(samples), judge=SHIPPED, output=str(out), mode="all", device="cpu", **kw),
              log=lambda _: None)
        return [json.loads(x) for x in out.read_text().splitlines()]

    here, there = run("hf"), run("openai", **remote)
    assert [(r["chosen"], r["rejected"]) for r in here] == [(r["chosen"], r["rejected"]) for r in there]
    assert [r["margin"] for r in there] == pytest.approx([r["margin"] for r in here], abs=1e-4)
    from prefalign.judges.remote import RemotePairwiseJudge

    local = PairwiseJudge(SHIPPED)
    served = RemotePairwiseJudge(SHIPPED, remote["base_url"], remote["api_key_env"])
    items = [(r["prompt"], r["completions"][0], r["completions"][1]) for r in rows]
    assert served.first_probs(items).tolist() == pytest.approx(local.first_probs(items).tolist(), abs=1e-5)
    assert served.chat is False  # the shipped model has no chat template: asked as a plain prompt


def test_settings_that_cannot_work_are_refused_early(prompts, remote, tmp_path, monkeypatch):
    from prefalign.config import load_config
    from prefalign.feedback.sample import SampleConfig, sample
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    base = {"model": SHIPPED, "prompts": prompts, "output": "x"}
    with pytest.raises(ConfigError, match="generation_backend: openai needs base_url"):
        load_config(SampleConfig, overrides=["generation_backend=openai"], base=base)
    with pytest.raises(ConfigError, match="base_url is for generation_backend: openai"):
        load_config(SampleConfig, overrides=["base_url=http://127.0.0.1:1/v1"], base=base)
    with pytest.raises(ModelError, match="does not serve 'nope'"):
        sample(SampleConfig(model=SHIPPED, prompts=prompts, output=str(tmp_path / "s.jsonl"), served_model="nope",
                            **remote), log=lambda _: None)
    monkeypatch.setenv("PREFALIGN_TEST_KEY", "wrong")
    with pytest.raises(ConfigError, match="cannot list the served models: AuthenticationError"):
        sample(SampleConfig(model=SHIPPED, prompts=prompts, output=str(tmp_path / "s.jsonl"), **remote),
               log=lambda _: None)
    cfg = make_config(method="grpo", model=SHIPPED, prompts=prompts, reward="prefalign.judges.sentiment:positive",
                      output=str(tmp_path / "rl"), **remote)
    with pytest.raises(ConfigError, match="samples from the policy it trains"):
        train(cfg, progress=False)


def test_the_plain_judge_scores_the_prompt_even_where_eos_comes_next(remote):
    """The judge reads log p(letter | question) as the last echoed prompt token. It used to ask for one
    generated token too and take the second-to-last: when that token was EOS, which a server leaves out
    of the tokens, it read the token before the letter. Here the greedy next token is EOS."""
    import torch

    from prefalign.judges.remote import RemotePairwiseJudge
    from prefalign.models.generate import encode_prompt, eos_ids
    from prefalign.models.load import load_model, load_tokenizer

    prompts = ["This movie was great. I give it 10/10.", "I loved this movie because"]
    tok, model = load_tokenizer(SHIPPED), load_model(SHIPPED)
    here = []
    for text in prompts:
        ids = encode_prompt(tok, text)
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        here.append(float(logps[-2, ids[-1]]))
        if text == prompts[0]:
            assert int(logps[-1].argmax()) in eos_ids(tok, model)  # the case this test is about
    judge = RemotePairwiseJudge(SHIPPED, remote["base_url"], remote["api_key_env"])
    assert judge.last_token_logprobs(prompts) == pytest.approx(here, abs=1e-5)


def test_the_chat_judge_adds_the_spellings_of_a_letter():
    """Top log-probs may list " A" and "A" (and "A\\n"): one answer, their probabilities add; a later,
    less likely spelling must not replace an earlier one."""
    import math

    from prefalign.judges.remote import letter_logprobs

    top = [(" A", -0.5), ("B", -1.5), ("C", -1.6), ("A", -3.0), (" B\n", -4.0), ("A", -5.0)]
    got = letter_logprobs(top, ("A", "B"))
    assert got["A"] == pytest.approx(math.log(math.exp(-0.5) + math.exp(-3.0) + math.exp(-5.0)), abs=1e-12)
    assert got["B"] == pytest.approx(math.log(math.exp(-1.5) + math.exp(-4.0)), abs=1e-12)
    assert letter_logprobs([("C", -0.1), (" no", -2.0)], ("A", "B")) == {}
