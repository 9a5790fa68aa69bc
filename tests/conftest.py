import os
import random

import pytest

# Tests never download: model and dataset ids resolve from the Hub cache only (docs/hub.md). Set here, at
# import, before anything imports huggingface_hub or transformers (they read it once); subprocesses inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
# `make test` runs the suite in one worker per core (pytest-xdist): each worker and the processes it starts
# compute on one thread, so two workers share the cores instead of fighting over them (OpenMP spin-waits
# made a busy machine several times slower); a plain `pytest` keeps torch's default threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"



@pytest.fixture(autouse=True)
def _fresh_fail_points():
    """Every test counts fail-point hits from 1 (prefalign/faults.py): a test that sets the same
    PREFALIGN_FAULTS value as the one before it in this process would otherwise go on from its counts."""
    from prefalign import faults

    faults.reset()


WORDS = ("the movie was great good bad awful fine plot actor story answer yes no question what why "
         "because I you we it is are love hate film scene end begin human assistant hello thanks").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + rng.choice([".", "?", "!"])
            for _ in range(n)] + ["Answer: yes", "Question: what? Answer: no", "Human: hi\n\nAssistant: hello"]


@pytest.fixture(scope="session")
def tokenizer():
    from prefalign.models.tiny import build_tokenizer

    return build_tokenizer(corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def bos_tokenizer():
    from prefalign.models.tiny import build_tokenizer

    return build_tokenizer(corpus(), vocab_size=400, bos=True)


SUBJECTS = "the movie film plot story scene actor".split()


def learnable_pairs(n: int = 48, seed: int = 0) -> list[dict]:
    """A preference set a tiny model can learn but a random one cannot already rank: which answer
    is preferred depends on the prompt ("loved" -> praise is chosen, "hated" -> the pan is), so any
    fixed bias of an untrained model gets about half of the pairs right."""
    rng = random.Random(seed)
    good, bad = ["good", "great", "fine"], ["bad", "awful"]
    rows = []
    for i in range(n):
        loved = i % 2 == 0
        subject = " ".join(rng.choice(SUBJECTS) for _ in range(rng.randint(1, 4)))
        praise, pan = f" it was {rng.choice(good)}.", f" it was {rng.choice(bad)}."
        rows.append({"prompt": f"I {'loved' if loved else 'hated'} {subject}",
                     "chosen": praise if loved else pan, "rejected": pan if loved else praise})
    return rows


def held_out_pairs(train: list[dict], n: int = 32, seed: int = 1) -> list[dict]:
    """Pairs of the same task whose prompts are not in `train`: accuracy on them is generalisation."""
    seen = {r["prompt"] for r in train}
    rows = [r for r in learnable_pairs(4 * n, seed) if r["prompt"] not in seen]
    assert len(rows) >= n, "not enough unseen prompts"
    return rows[:n]


def unpaired_from(pairs: list[dict], both: bool = False) -> list[dict]:
    """KTO rows: alternately the chosen (desirable) or the rejected (undesirable) answer of each pair;
    with `both`, each pair gives one of each (the usual pairs-to-KTO conversion)."""
    if both:
        return [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs
                for k in ("chosen", "rejected")]
    out = []
    for i, p in enumerate(pairs):
        out.append({"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
                    "label": i % 2 == 0})
    return out


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def nan_model(tiny_llama, folder):
    """A tiny llama folder (the tokenizer of `tiny_llama`) whose every loss is NaN (its final norm is),
    for the tests of the NaN guard: every step is skipped until max_bad_steps stops the run."""
    import torch

    from prefalign.models.load import load_tokenizer
    from prefalign.models.tiny import build_model

    tok = load_tokenizer(tiny_llama)
    model = build_model("llama", tok, hidden=32)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """arch -> folder of a saved random-init tiny model sharing the session tokenizer."""
    from prefalign.models.tiny import ARCHS, save_tiny

    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny(root / arch, arch, tokenizer, hidden=32) for arch in ARCHS}


@pytest.fixture(scope="session")
def pair_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", learnable_pairs())


def headless_chromium(profile, *flags):
    """Debian's chromium through its chromedriver (the report and review pages are checked in a real
    browser); skipped where neither is installed, a failure where PREFALIGN_REQUIRE_BROWSER says so (CI)."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("PREFALIGN_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", *flags):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def listening(port: int) -> set[str]:
    """The local addresses a socket listens on at `port`, from Linux's /proc/net/tcp and tcp6 (what a
    server bound, not what it printed); skipped where there is no /proc."""
    import ipaddress
    import sys
    from pathlib import Path

    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("no /proc/net/tcp on this machine")
    found = set()
    for table in (t for t in tables if t.exists()):
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # the address in 32-bit words of the host's byte order
                words = b"".join(raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4]
                                 for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found
