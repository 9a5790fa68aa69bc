"""`prefalign serve` through the official `openai` client over loopback: a real server process on the
shipped model plus a tiny LoRA adapter on it (the base loaded once), with an API key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")

from test_metric_docs import documented, undocumented  # noqa: E402

SHIPPED = str(Path(__file__).resolve().parent.parent / "src" / "prefalign" / "assets" / "imdb-lm")
KEY = "test-key-123"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int, env: dict | None = None, timeout: float = 60) -> subprocess.Popen:
    """A `prefalign serve` process, returned once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "prefalign", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not answer /health in time")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on the shipped model whose B matrices are non-zero: it changes the outputs."""
    import torch

    from prefalign.models.load import add_lora, load_model, load_tokenizer, save_model

    torch.manual_seed(0)
    model = add_lora(load_model(SHIPPED), {"r": 4})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("lora") / "final"
    save_model(model, load_tokenizer(SHIPPED), out, base=SHIPPED)
    return str(out)


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    port = free_port()
    proc = start([SHIPPED, adapter, "--api-key", KEY, "--max-tokens", "256", "--max-body", "20000",
                  "--chat-template", str(template), "--threads", "1"], port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def stats(server: str) -> dict:
    return httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_models_listed_and_base_loaded_once(client, server, adapter):
    ids = [m.id for m in client.models.list()]
    assert ids == [SHIPPED, adapter]
    assert stats(server)["base_models"] == 1  # the adapter rides on the shipped model's weights


def test_completion_chat_and_adapter(client, adapter):
    import torch

    from prefalign.models.generate import encode_prompt
    from prefalign.models.load import load_model, load_tokenizer

    r = client.completions.create(model=SHIPPED, prompt="I loved this movie", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(encode_prompt(load_tokenizer(SHIPPED), "I loved this movie"))
    assert 1 <= r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens
    # greedy equals transformers' greedy decoding in process, for the base and for the adapter (merged)
    tok = load_tokenizer(SHIPPED)
    ids = torch.tensor([encode_prompt(tok, "I loved this movie")])
    for name, text in ((SHIPPED, r.choices[0].text),
                       (adapter, client.completions.create(model=adapter, prompt="I loved this movie", max_tokens=12,
                                                           temperature=0).choices[0].text)):
        out = load_model(name).generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    chat = client.chat.completions.create(model=SHIPPED, messages=[{"role": "user", "content": "Was it good?"}],
                                          max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(tok("user: Was it good?\nassistant:")["input_ids"])


def test_streaming_matches_the_whole_answer(client, server):
    kw = dict(model=SHIPPED, prompt="The plot was", max_tokens=20, seed=7, n=2)
    whole = client.completions.create(**kw)
    texts, finish = {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    # the wire format: OpenAI's chunks, then data: [DONE]; chat chunks start with the role
    body = {"model": SHIPPED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = [x for x in httpx.post(f"{server}/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}).text.split("\n\n") if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["choices"] == []


def test_n_seed_stop_and_logprobs(client):
    r = client.completions.create(model=SHIPPED, prompt="I hated", max_tokens=16, n=3, seed=3, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) > 1
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    again = client.completions.create(model=SHIPPED, prompt="I hated", max_tokens=16, n=3, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    other = client.completions.create(model=SHIPPED, prompt="I hated", max_tokens=16, n=3, seed=4)
    assert [c.text for c in other.choices] != [c.text for c in r.choices]
    text = r.choices[0].text
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:2]
    cut = client.completions.create(model=SHIPPED, prompt="I hated", max_tokens=16, n=3, seed=3, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_refusals(client, server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server}/v1/models").status_code == 401  # no key at all
    assert httpx.get(f"{server}/health").status_code == 200  # health alone needs none
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        client.completions.create(model=SHIPPED, prompt="x", max_tokens=257)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        client.completions.create(model=SHIPPED, prompt="hello " * 1000, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="max_token"):
        client.completions.create(model=SHIPPED, prompt="x", extra_body={"max_token": 3})  # a typo is an error
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{server}/v1/completions", content=b'{"model": "x", "prompt": ', headers=auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    big = httpx.post(f"{server}/v1/completions", headers=auth,
                     content=json.dumps({"model": SHIPPED, "prompt": "word " * 10000}).encode())
    assert big.status_code == 413 and "over the limit" in big.json()["error"]["message"]
    assert httpx.get(f"{server}/openapi.json", headers=auth).json()["paths"].keys() >= {
        "/v1/models", "/v1/completions", "/v1/chat/completions", "/health"}
    assert client.completions.create(model=SHIPPED, prompt="still up", max_tokens=2).choices  # nothing crashed


def test_concurrent_requests_share_decode_steps_and_keep_their_seeds(client, server):
    """Six clients at once, 48 tokens each (past EOS): the scheduler's counters show steps that decoded
    several requests together; each seeded answer equals the same request sent alone."""
    kw = dict(model=SHIPPED, max_tokens=48, extra_body={"ignore_eos": True})
    alone = client.completions.create(prompt="A film about", seed=11, **kw).choices[0].text
    before = stats(server)["requests_per_step"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = client.completions.create(prompt="A film about" if i == 0 else f"Movie number {i}",
                                               seed=11 if i == 0 else i, **kw).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(server)
    shared = sum(v - before.get(k, 0) for k, v in after["requests_per_step"].items() if int(k) >= 2)
    assert shared > 0 and after["max_requests_per_step"] >= 2, after
    assert results[0] == alone
    assert undocumented(after, documented()) == set()


def test_non_loopback_without_key_refused():
    out = subprocess.run([sys.executable, "-m", "prefalign", "serve", SHIPPED, "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PREFALIGN_API_KEY": ""})
    assert out.returncode == 2 and "not a loopback address" in out.stderr


def test_a_request_joins_a_running_batch(client, server):
    """Continuous batching: a short request sent while a long one decodes is merged into its batch and
    answered first (batching only at request boundaries would make it wait for the long one)."""
    done: dict[str, float] = {}

    def long() -> None:
        client.completions.create(model=SHIPPED, prompt="Once", max_tokens=150, extra_body={"ignore_eos": True})
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    while stats(server)["running_rows"] == 0:
        time.sleep(0.01)
    client.completions.create(model=SHIPPED, prompt="Twice", max_tokens=4, extra_body={"ignore_eos": True})
    done["short"] = time.monotonic()
    thread.join()
    assert done["short"] < done["long"]


def test_the_remote_pairwise_judge_asks_a_chat_model_by_chat(server, monkeypatch):
    """With a chat template the remote judge asks through /v1/chat/completions (the letters' top
    log-probs, or its parsed answer): probabilities, in both orders, without error."""
    from prefalign.judges.remote import RemotePairwiseJudge

    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    judge = RemotePairwiseJudge(SHIPPED, f"{server}/v1", "SERVE_TEST_KEY")
    p, agree = judge.compare(["Was it good?", "The plot"], ["Yes, great.", "thin"], ["No.", "a delight"])
    assert judge.chat is True and p.shape == (2,) and agree.shape == (2,)
    assert all(0 <= x <= 1 for x in p.tolist())
