"""Hub ids for models, tokenizers and datasets, resolved from a Hugging Face cache with HF_HUB_OFFLINE=1
(conftest sets it), and everything a push does before the upload.

The cache is laid out as huggingface_hub lays it out (repo_folder_name's models--org--name, refs/<branch>
holding the commit, snapshots/<commit>/ of symlinks into blobs/<sha256>), and huggingface_hub's own
scan_cache_dir must read it back before anything else is tested against it.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import held_out_pairs, learnable_pairs

TRAIN = learnable_pairs(24)
TEST = held_out_pairs(TRAIN, 8)
COMMITS = {name: hashlib.sha1(name.encode()).hexdigest() for name in ("tiny-main", "tiny-v2", "pairs-main")}


def put(repo: Path, commit: str, files: dict[str, bytes], ref: str | None = None) -> None:
    """One commit of a cached repo, as huggingface_hub's downloads leave it."""
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_models):
    """org/tiny: main is the tiny llama, tag v2 the tiny gpt2; org/pairs: a train split in two shards
    and a test split, with a card."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    root = tmp_path_factory.mktemp("hub")
    tiny = root / repo_folder_name(repo_id="org/tiny", repo_type="model")
    put(tiny, COMMITS["tiny-main"], folder_files(tiny_models["llama"]), "main")
    put(tiny, COMMITS["tiny-v2"], folder_files(tiny_models["gpt2"]), "v2")
    put(root / repo_folder_name(repo_id="org/pairs", repo_type="dataset"), COMMITS["pairs-main"],
        {"README.md": b"# pairs\n", "data/train-00000-of-00002.jsonl": jsonl(TRAIN[:10]),
         "data/train-00001-of-00002.jsonl": jsonl(TRAIN[10:]), "data/test-00000-of-00001.jsonl": jsonl(TEST)},
        "main")
    seen = {(r.repo_id, r.repo_type): {c.commit_hash: set(c.refs) for c in r.revisions}
            for r in scan_cache_dir(root).repos}
    assert seen == {("org/tiny", "model"): {COMMITS["tiny-main"]: {"main"}, COMMITS["tiny-v2"]: {"v2"}},
                    ("org/pairs", "dataset"): {COMMITS["pairs-main"]: {"main"}}}
    return root


@pytest.fixture
def hub(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: nothing is fetched in the tests
    return cache


def test_hub_ids_parse_and_local_paths_do_not():
    from prefalign.data.hub import HubRef, parse_hub_id

    assert parse_hub_id("org/name") == HubRef("org/name")
    assert parse_hub_id("org/name@v1.0/data/train.jsonl") == HubRef("org/name", "v1.0", "data/train.jsonl")
    assert parse_hub_id("org/name@refs%2Fpr%2F1") == HubRef("org/name", "refs/pr/1")
    assert str(HubRef("org/name", "refs/pr/1", "a.jsonl")) == "org/name@refs%2Fpr%2F1/a.jsonl"
    for local in ("/abs/path", "./org/name", "../org/name", "name", "org/na--me", "org/name/../x",
                  "rewards/great.py:score", "tests/fixtures/rewards.py:great", "org/name@", "~/org/name"):
        assert parse_hub_id(local) is None, local


def test_model_and_tokenizer_by_id_and_revision(hub, tiny_models):
    from prefalign.models.load import load_model, load_tokenizer_for

    main, v2 = load_model("org/tiny"), load_model("org/tiny@v2")
    assert type(main).__name__ == "LlamaForCausalLM" and type(v2).__name__ == "GPT2LMHeadModel"
    assert type(load_model(f"org/tiny@{COMMITS['tiny-v2']}")).__name__ == "GPT2LMHeadModel"  # a commit
    local = load_model(tiny_models["llama"])
    assert all(torch.equal(a, b) for a, b in zip(main.state_dict().values(), local.state_dict().values(), strict=True))
    assert load_tokenizer_for("org/tiny@v2")("it was good")["input_ids"]


def test_missing_ids_name_the_cache_they_looked_in(hub):
    from prefalign.data import load_records
    from prefalign.errors import DataError, ModelError
    from prefalign.models.load import load_model

    with pytest.raises(ModelError) as e:
        load_model("org/absent")
    assert "org/absent" in str(e.value) and str(hub / "models--org--absent") in str(e.value)
    assert "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(ModelError, match="org/tiny@v3.*revision v3.*not in the cache"):
        load_model("org/tiny@v3")
    with pytest.raises(DataError) as e:
        load_records("org/absent")
    assert str(hub / "datasets--org--absent") in str(e.value)
    with pytest.raises(DataError, match="no 'data/valid.jsonl' in the Hub dataset org/pairs.*data/test-"):
        load_records("org/pairs/data/valid.jsonl")


def test_dataset_files_splits_and_a_file_inside(hub):
    from prefalign.data import load_records
    from prefalign.data.readers import read_rows

    records, problems = load_records("org/pairs")  # the train split: both shards, in order
    assert not problems and [r.prompt for r in records] == [r["prompt"] for r in TRAIN]
    assert {Path(r.where.file).name for r in records} == {"train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"}
    assert [row.value for row in read_rows("org/pairs", split="test")] == TEST
    assert [r.prompt for r in load_records("org/pairs@main/data/test-00000-of-00001.jsonl")[0]] == \
        [r["prompt"] for r in TEST]
    with pytest.raises(Exception, match="org/pairs: no split 'validation'; its splits are test, train"):
        read_rows("org/pairs", split="validation")


@pytest.mark.parametrize("layout", [
    ["data/train_prefs-00000-of-00001.parquet", "data/train_sft-00000-of-00002.parquet",
     "data/train_sft-00001-of-00002.parquet", "data/test_prefs-00000-of-00001.parquet"],  # ultrafeedback_binarized
    ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl", "data/test-00000-of-00001.jsonl"],
    ["train.jsonl", "test.jsonl", "train_extra.jsonl"], ["train/a.csv", "validation/b.csv"]])
def test_split_files_are_the_ones_datasets_picks(layout, tmp_path):
    """datasets' own pattern resolution is the reference: a split's files are exactly those it assigns the
    split (train_prefs is not train), and a split it does not see is an error listing the ones it does."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    from prefalign.data.hub import HubRef, pick_data_files
    from prefalign.errors import DataError

    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    patterns = get_data_patterns(str(tmp_path))
    def files(pattern: str) -> list[str]:  # datasets raises for a pattern that matches nothing
        try:
            return [Path(f).relative_to(tmp_path).as_posix() for f in resolve_pattern(pattern, str(tmp_path))]
        except FileNotFoundError:
            return []

    expected = {str(split): sorted({f for p in pats for f in files(p)}) for split, pats in patterns.items()}
    for split in ("train", "test", "validation", "train_prefs", "train_sft", "test_prefs"):
        if split in expected:
            got = pick_data_files(tmp_path, split, HubRef("org/x"))
            assert sorted(f.relative_to(tmp_path).as_posix() for f in got) == expected[split], split
        else:
            with pytest.raises(DataError, match=f"no (files of )?split '{split}'"):
                pick_data_files(tmp_path, split, HubRef("org/x"))


def test_a_source_split_reads_that_split_of_a_hub_dataset(hub, tokenizer, tmp_path):
    """data: [{path: org/pairs, split: test}] trains on the test split's rows, not train's."""
    from prefalign.train.methods import train_config
    from prefalign.train.sources import load_examples

    cfg = train_config({"method": "dpo", "model": "m", "output": str(tmp_path),
                        "data": [{"path": "org/pairs", "split": "test"}]})
    data, uses = load_examples(cfg.data, "data", cfg, tokenizer, "pairs", tmp_path, "data", lambda _: None)
    assert uses[0].available == len(TEST) and len(data.examples) == len(TEST)


def test_a_local_path_shaped_like_an_id_wins(hub, tiny_models, tmp_path, monkeypatch):
    import shutil

    from prefalign.data import load_records
    from prefalign.models.load import load_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["gpt2"], tmp_path / "org" / "tiny")  # the cache's org/tiny main is the llama
    (tmp_path / "org" / "pairs").write_bytes(jsonl(TRAIN[:3]))  # no suffix: the reader peeks at it
    assert type(load_model("org/tiny")).__name__ == "GPT2LMHeadModel"
    assert len(load_records("org/pairs")[0]) == 3


@pytest.fixture(scope="module")
def hub_run(cache, tmp_path_factory):
    """2 LoRA DPO steps with model, data and eval_data all Hub ids."""
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    out = tmp_path_factory.mktemp("hub_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        lines = []
        cfg = make_config(method="dpo", model="org/tiny", data="org/pairs",
                          eval_data="org/pairs/data/test-00000-of-00001.jsonl", eval_every=2, output=str(out),
                          max_steps=2, batch_size=4, lora=True, kl_every=0)
        train(cfg, log=lines.append, progress=False)
    return out, lines


def test_training_on_hub_ids_records_the_base_commit(hub_run, hub):
    from prefalign.models.load import load_model

    out, lines = hub_run
    assert any(line.startswith(f"org/pairs: {len(TRAIN)} examples") for line in lines), lines
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    # the base as its id and the commit main pointed to: the adapter loads on the weights it was trained on
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("org/tiny", COMMITS["tiny-main"])
    assert type(load_model(out / "final")).__name__ == "LlamaForCausalLM"  # merged onto the cached base


def test_push_plan_uploads_final_only_safetensors_and_configs(hub_run, tmp_path):
    import shutil

    from prefalign.errors import ModelError
    from prefalign.models.hub import plan_push

    final = tmp_path / "final"
    shutil.copytree(hub_run[0] / "final", final)
    (final / "README.md").write_text("# card\n")
    for stray in ("optimizer.pt", "pytorch_model.bin", "train.log", "checkpoints/step-2/trainable.safetensors"):
        (final / stray).parent.mkdir(parents=True, exist_ok=True)
        (final / stray).write_bytes(b"x")
    plan = plan_push(final, "org/tiny-dpo", private=True)
    assert (plan.repo_id, plan.private, plan.folder) == ("org/tiny-dpo", True, final)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= set(plan.files)
    assert sorted(plan.left_out) == ["checkpoints/step-2/trainable.safetensors", "optimizer.pt", "pytorch_model.bin",
                                     "train.log"]
    assert set(plan.files) | set(plan.left_out) == {p.relative_to(final).as_posix() for p in final.rglob("*")
                                                    if p.is_file()}
    (final / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights to push"):
        plan_push(final, "org/tiny-dpo")


def test_push_config_is_checked_before_any_training(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from prefalign.errors import ConfigError
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    base = dict(method="dpo", model="org/tiny", data="org/pairs", output=str(tmp_path / "my-run"))
    assert make_config(**base, push_to_hub=True).hub_repo_id == "my-run"  # default: the output folder's name
    assert make_config(**base, push_to_hub=True, hub_model_id="org/x").hub_repo_id == "org/x"
    for bad, why in ((dict(push_to_hub=True, hub_model_id="org/a b"), "not a Hub repo id"),
                     (dict(push_to_hub=True, hub_model_id="org/x@main"), "not a Hub repo id"),
                     (dict(hub_model_id="org/x"), "are for push_to_hub: true"),
                     (dict(hub_private=True), "are for push_to_hub: true")):
        with pytest.raises(ConfigError, match=why):
            make_config(**base, **bad)
    cfg = make_config(**base, push_to_hub=True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        train(cfg, log=lambda _: None, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # not the user's
    with pytest.raises(ConfigError, match="needs a Hugging Face token"):
        train(cfg, log=lambda _: None, progress=False)
    assert not (tmp_path / "my-run").exists()  # both refused before the run folder was made


def test_a_failed_upload_says_the_run_is_saved(hub_run):
    from prefalign.errors import TrainingError
    from prefalign.models.hub import push_final

    final = hub_run[0] / "final"
    # offline (conftest), huggingface_hub refuses the request itself: the path up to the network, no further
    with pytest.raises(TrainingError, match=f"{final} is saved, but pushing it to org/tiny-dpo failed.*hf upload"):
        push_final(final, "org/tiny-dpo", private=False, log=lambda _: None)


def test_only_safe_files_of_a_model_repo_are_fetched():
    """Filtered by huggingface_hub's own filter_repo_objects, the one snapshot_download applies."""
    from huggingface_hub.utils import filter_repo_objects

    from prefalign.data.hub import HubRef, model_patterns

    repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "tokenizer.json", "tokenizer.model", "merges.txt", "chat_template.jinja", "training_args.bin",
            "modeling_x.py", "model.q4.gguf", "onnx/model.onnx", "original/consolidated.00.pth",
            "draft/model.safetensors", "draft/config.json", "draft/tokenizer.json"]

    def fetched(ref, **kw):
        allow, ignore = model_patterns(ref, **kw)
        return sorted(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore))

    assert fetched(HubRef("org/m")) == ["chat_template.jinja", "config.json", "merges.txt",
                                        "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                        "tokenizer.json", "tokenizer.model"]
    assert fetched(HubRef("org/m"), tokenizer_only=True) == ["chat_template.jinja", "config.json", "merges.txt",
                                                             "model.safetensors.index.json", "tokenizer.json",
                                                             "tokenizer.model"]
    assert "modeling_x.py" in fetched(HubRef("org/m"), code=True)
    assert fetched(HubRef("org/m", inside="draft")) == ["draft/config.json", "draft/model.safetensors",
                                                        "draft/tokenizer.json"]
    assert fetched(HubRef("org/m", inside="model.q4.gguf")) == ["model.q4.gguf"]


def test_the_cli_goes_online_unless_told_not_to(tmp_path):
    """With HF_HUB_OFFLINE unset the CLI asks the Hub (here a loopback server answering 404 to everything)
    and says what it answered. (Offline, the same id is looked up in the cache only: tests above.)"""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = []

    class NoRepos(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoRepos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "home"),
               HF_HUB_CACHE=str(tmp_path / "cache"), HF_TOKEN="")
    try:
        run = subprocess.run([sys.executable, "-m", "prefalign", "data", "stats", "org/pairs"], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
    finally:
        server.shutdown()
    assert run.returncode == 2 and "org/pairs: no such local path, and the Hub dataset org/pairs (revision main) " \
        "does not exist, or it is private" in run.stderr, run.stderr
    # (huggingface_hub also fetches its agent-harness registry, /api/agent-harnesses, when online)
    assert "/api/datasets/org/pairs/revision/main" in asked, asked
