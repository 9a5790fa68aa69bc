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

from conftest import listening  # noqa: E402
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
    # OpenAI's format: with include_usage every other chunk has usage null; the finish comes in a chunk
    # of its own whose delta is {}, after the last text
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    finishing = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["finish_reason"] is not None]
    assert len(finishing) == 1 and finishing[0]["delta"] == {} and chunks[-2]["choices"][0] == finishing[0]


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


BAD = [  # (path, body changes, the field the 400 names): each is the client's to fix, never a 500
    ("completions", {"prompt": []}, "prompt"), ("completions", {"prompt": [""]}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"), ("completions", {"prompt": ["ok", []]}, "prompt"),
    ("completions", {"prompt": [-1]}, "prompt"), ("completions", {"n": 0}, "n"),
    ("completions", {"max_tokens": -1}, "max_tokens"), ("completions", {"seed": 2**64}, "seed"),
    ("completions", {"seed": -2**63 - 1}, "seed"), ("completions", {"temperature": -0.5}, "temperature"),
    ("completions", {"logprobs": 21}, "logprobs"), ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"max_tokens": 0}, "max_tokens"), ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("path,change,param", BAD, ids=[f"{p}:{json.dumps(c)}" for p, c, _ in BAD])
def test_bad_fields_are_400_in_openai_shape(server, path, change, param):
    body = {"model": SHIPPED, "max_tokens": 2, **({"messages": [{"role": "user", "content": "hi"}]}
                                                   if path.startswith("chat") else {"prompt": "hi"}), **change}
    r = httpx.post(f"{server}/v1/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert param in error["message"] or error["param"] == param, error


def test_a_bad_seed_is_refused_while_a_running_request_goes_on(server):
    """A seed past 64 bits used to raise in the engine thread: every request decoding with it got a 500
    and the offender never got an answer. Now it is a 400 and the running request ends normally."""
    auth = {"Authorization": f"Bearer {KEY}"}
    done = {}

    def victim() -> None:
        done["victim"] = httpx.post(f"{server}/v1/completions", headers=auth, timeout=60, json={
            "model": SHIPPED, "prompt": "Once", "max_tokens": 80, "ignore_eos": True})

    thread = threading.Thread(target=victim)
    thread.start()
    while stats(server)["running_rows"] == 0:
        time.sleep(0.01)
    bad = httpx.post(f"{server}/v1/completions", headers=auth, timeout=10,
                     json={"model": SHIPPED, "prompt": "x", "max_tokens": 2, "seed": 2**64})
    thread.join(60)
    assert not thread.is_alive(), "the running request got no answer"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed", bad.text
    assert done["victim"].status_code == 200 and done["victim"].json()["usage"]["completion_tokens"] == 80


def test_a_request_must_fit_in_a_batch(client):
    """n x prompts rows are decoded together: more than --max-batch (32 here) is refused, naming the flag;
    more prompts than --max-prompts likewise; 16 x 2 = 32 fits."""
    with pytest.raises(openai.BadRequestError, match=r"16 x 3 = 48 completions.*at most 32 together \(--max-batch\)"):
        client.completions.create(model=SHIPPED, prompt=["a", "b", "c"], n=16, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=r"65 prompts.*at most 64 per request \(--max-prompts\)"):
        client.completions.create(model=SHIPPED, prompt=["a"] * 65, max_tokens=1)
    assert len(client.completions.create(model=SHIPPED, prompt=["a", "b"], n=16, max_tokens=1).choices) == 32


def test_a_client_that_disconnects_leaves_the_batch(server):
    """A non-streaming client that closes its connection: its rows stop decoding at once (FastAPI does not
    cancel the handler by itself), long before max_tokens would end them."""
    body = json.dumps({"model": SHIPPED, "prompt": "Once", "max_tokens": 256, "ignore_eos": True}).encode()
    before = stats(server)["generated_tokens"]
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        while stats(server)["running_rows"] == 0:
            time.sleep(0.01)
    end = time.monotonic() + 20
    while stats(server)["running_rows"] and time.monotonic() < end:
        time.sleep(0.02)
    after = stats(server)
    assert after["running_rows"] == 0 and after["generated_tokens"] - before < 128, after


def test_concurrent_requests_share_decode_steps_and_keep_their_seeds(client, server):
    """Six clients at once, 48 tokens each (past EOS): the scheduler's counters show steps that decoded
    several requests together; each seeded answer equals the same request sent alone."""
    kw = dict(model=SHIPPED, max_tokens=48, logprobs=0, extra_body={"ignore_eos": True,
                                                                    "return_tokens_as_token_ids": True})
    alone = token_ids(client.completions.create(prompt="A film about", seed=11, **kw))
    before = stats(server)["requests_per_step"]
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        results[i] = token_ids(client.completions.create(prompt="A film about" if i == 0 else f"Movie number {i}",
                                                         seed=11 if i == 0 else i, **kw))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(server)
    shared = sum(v - before.get(k, 0) for k, v in after["requests_per_step"].items() if int(k) >= 2)
    assert shared > 0 and after["max_requests_per_step"] >= 2, after
    if results[0] != alone:
        step, margin = near_tie("A film about", 11, alone, results[0])
        if margin < 1e-4:  # a shared batch's logits may round differently (jobs.py): reported, not hidden
            pytest.xfail(f"the seeded draw parted from the one alone at token {step}, where the two best tokens of "
                         f"argmax(p / q) were within {margin:.1e} of each other: a rounding flip, not a seed bug")
        pytest.fail(f"the seeded draw parted from the one alone at token {step}, where the draw was not close "
                    f"(relative margin {margin:.3f}): the request did not keep its own generator")
    assert undocumented(after, documented()) == set()


def token_ids(completion) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in completion.choices[0].logprobs.tokens]


def near_tie(prompt: str, seed: int, alone: list[int], other: list[int]) -> tuple[int, float]:
    """Where `other` parts from `alone` (a request of one row, temperature 1, seeded), and how close the
    draw was there: the relative gap between the two best p / q, with the model run here on the prompt
    and `alone`, and q drawn from the request's generator as the engine draws it (serve/jobs.py)."""
    import torch

    from prefalign.models.generate import encode_prompt
    from prefalign.models.load import load_model, load_tokenizer

    step = next(i for i, (a, b) in enumerate(zip(alone, other, strict=True)) if a != b)
    ids = encode_prompt(load_tokenizer(SHIPPED), prompt)
    with torch.no_grad():
        logits = load_model(SHIPPED)(torch.tensor([ids + alone])).logits[0, len(ids) - 1:-1].float()
    probs, generator = torch.softmax(logits, -1), torch.Generator().manual_seed(seed)
    for t in range(step + 1):
        score = probs[t] / torch.empty((1, probs.shape[-1])).exponential_(1, generator=generator)[0]
        best = torch.topk(score, 2).values
        assert t == step or int(score.argmax()) == alone[t], f"the draw here does not reproduce token {t}"
    return step, float((best[0] - best[1]) / best[0])


def test_it_binds_loopback_when_no_host_is_given(server):
    assert listening(int(server.rsplit(":", 1)[1])) == {"127.0.0.1"}  # what is bound, not what was printed


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
