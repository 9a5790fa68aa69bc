"""report_to: each tracker, in its local mode, read back with its own reader, holds metrics.jsonl's series (same
keys, steps, values) and the run's config; a resumed run goes on in the same tracker run without a step twice;
`prefalign report` adds its plots to every tracker run; nothing (wandb-core, trackio's threads) outlives a run.

One tiny DPO run is shared: 3 steps with a checkpoint at 2, then resumed to 4 (as after a crash at step 3), then
reported. W&B 0.31 has no Python reader of its offline files any more (wandb.sdk.internal.datastore is gone), so
`wandb_records` reads their framing (LevelDB's log: 32 KiB blocks, 7-byte chunk headers, CRC-checked) and decodes
each record with wandb's own protobuf schema."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import learnable_pairs, nan_model, write_jsonl
from prefalign.errors import ConfigError
from prefalign.train.methods import make_config
from prefalign.train.run import train

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]
PROJECT = "prefalign-test"


def rows_of(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x]


def series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] in step order: what a tracker must plot."""
    out: dict[str, list] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((row["step"], float(v)))
    return {k: sorted(v) for k, v in out.items()}


def same_series(got: dict, want: dict, rel: float = 1e-12) -> None:
    assert set(got) == set(want), (set(got) ^ set(want))
    for k in want:
        assert [s for s, _ in got[k]] == [s for s, _ in want[k]], k
        for (_, a), (_, b) in zip(got[k], want[k], strict=True):
            assert a == pytest.approx(b, rel=rel, abs=0 if rel < 1e-9 else 1e-12, nan_ok=True), (k, a, b)


@pytest.fixture(scope="module")
def tracked(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    env = pytest.MonkeyPatch()
    # W&B keeps its core logs and staged artifact files under the home folder unless told otherwise
    wandb_home = {f"WANDB_{k}_DIR": str(root / f"wandb-{k.lower()}") for k in ("CACHE", "DATA", "CONFIG")}
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
                 "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true",  # tests send nothing
                 "TRACKIO_DIR": str(root / "trackio"), **wandb_home}.items():
        env.setenv(k, v)
    env.delenv("WANDB_DIR", raising=False)
    if "trackio" in sys.modules:  # it reads TRACKIO_DIR once, when first imported
        import trackio.utils

        assert Path(trackio.utils.TRACKIO_DIR) == root / "trackio", "trackio was imported before TRACKIO_DIR was set"
    pairs = write_jsonl(root / "pairs.jsonl", learnable_pairs(16))
    run, lines, times = root / "run", [], {}
    base = dict(method="dpo", model=str(tiny_models["llama"]), data=str(pairs), eval_data=str(pairs), eval_every=2,
                kl_every=2, kl_prompts=2, kl_max_new_tokens=4, batch_size=4, output=str(run), save_every=2,
                report_to=ALL, tracker_project=PROJECT)
    t0, c0 = time.perf_counter(), time.process_time()
    train(make_config(**base, max_steps=3), log=lines.append, progress=False)
    first = rows_of((run / "metrics.jsonl").read_text())
    first_config = yaml.safe_load((run / "config.yaml").read_text())
    times["first"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(make_config(**base, max_steps=4, resume=True), log=lines.append, progress=False)  # from step-2
    times["resumed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from typer.testing import CliRunner

    from prefalign.cli.base import app

    report = CliRunner().invoke(app, ["report", str(run), "-o", str(root / "report")])
    assert report.exit_code == 0, report.output
    times["report"] = time.perf_counter() - t0
    print(f"tracker test phases (s): {times}; CPU {time.process_time() - c0:.1f} s in all")
    yield {"run": run, "root": root, "first": first, "final": rows_of((run / "metrics.jsonl").read_text()),
           "first_config": first_config, "config": yaml.safe_load((run / "config.yaml").read_text()),
           "state": json.loads((run / "trackers.json").read_text()), "lines": lines, "report": root / "report",
           "children": [p.name() for p in psutil.Process().children(recursive=True)],
           "threads": [t.name for t in threading.enumerate()]}
    env.undo()


def sent(tracked) -> dict[str, list[tuple[int, float]]]:
    """What W&B, MLflow and trackio must hold: the first attempt's rows up to the step it reached (3), then the
    resumed attempt's (metrics.jsonl has the re-run's step 3: its timings differ)."""
    reached = max(r["step"] for r in tracked["first"])
    return series(tracked["first"] + [r for r in tracked["final"] if r["step"] > reached])


def test_the_shared_run_resumed_and_logged_what_it_should(tracked):
    first, final = tracked["first"], tracked["final"]
    assert [r["step"] for r in first] == [0, 1, 2, 3] and [r["step"] for r in final] == [0, 1, 2, 3, 4]
    assert final[:3] == first[:3] and final[3]["loss"] == first[3]["loss"]  # exact resume: the same loss at step 3
    assert final[3]["step_seconds"] != first[3]["step_seconds"]  # ...but its own timing: the trackers keep the first
    assert {"eval/loss", "kl/policy_ref_token", "rewards/margins"} <= set(series(final))  # sparse keys too
    said = [x for x in tracked["lines"] if "step 3, logged before the interruption, keeps its first values" in x]
    assert sorted(x.split(":")[0] for x in said) == ["mlflow", "trackio", "wandb"], tracked["lines"]
    assert set(tracked["state"]) == set(ALL)


def test_nothing_outlives_the_runs(tracked):
    assert "wandb-core" not in tracked["children"], tracked["children"]
    assert not [t for t in tracked["threads"] if "batch_sender" in t or "monitor_loop" in t], tracked["threads"]


def test_tensorboard_holds_metrics_jsonl_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["run"]), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    got = {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
    # TensorBoard stores float32; purge_step hid what the first attempt logged after its checkpoint
    same_series(got, series(tracked["final"]), rel=1e-6)
    text = acc.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```")) == tracked["config"]
    assert {"report/curves"} <= set(acc.Tags()["images"])


def wandb_records(path: Path):
    """The records of a .wandb file, decoded with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos, pending = pos + 7 + length, pending + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_runs_hold_metrics_jsonl_the_config_and_the_report(tracked):
    run_id = tracked["state"]["wandb"]["id"]
    files = sorted((tracked["run"] / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 3  # the first attempt, the resumed one, the report's: one W&B run
    rows, config, artifacts, names = [], {}, [], []
    for path in files:
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert r.run.run_id == run_id and r.run.project == PROJECT
                names.append(r.run.display_name)
                config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append({"step": row.pop("_step"), **{k: v for k, v in row.items() if not k.startswith("_")}})
            elif kind == "artifact":
                artifacts.append(r.artifact)
    assert names[0] == "run"  # the run folder's name
    same_series(series(rows), sent(tracked))
    config.pop("_wandb")
    assert config == tracked["config"]  # the resumed attempt's (max_steps 4, resume true)
    assert [a.type for a in artifacts] == ["report"] and artifacts[0].name == f"report-{run_id}"
    report = tracked["report"]
    digests = {c.path: c.digest for c in artifacts[0].manifest.contents}
    want = {p.name: base64.b64encode(hashlib.md5(p.read_bytes()).digest()).decode()
            for p in [report / "curves.png", report / "report.html"]}
    assert digests == want


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as trackers log it: `guards.kl_max`."""
    out = {}
    for key, value in config.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return out


def test_mlflow_file_store_holds_metrics_jsonl_the_config_and_the_report(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    state = tracked["state"]["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == PROJECT
    history = client.get_metric_history
    got = {k: sorted((m.step, m.value) for m in history(run.info.run_id, k)) for k in run.data.metrics}
    same_series(got, sent(tracked))  # one value a step: the resumed attempt did not log step 3 again
    # params cannot change: the first attempt's config (flat here: lora false), each value as JSON unless a string
    params, config = run.data.params, flat(tracked["first_config"])
    assert set(params) == set(config)
    assert all(params[k] == v if isinstance(v, str) else json.loads(params[k]) == v for k, v in config.items())
    assert yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()) \
        == tracked["config"]
    names = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert names == {"report/curves.png", "report/report.html"}
    got = Path(client.download_artifacts(run.info.run_id, "report/curves.png", str(tmp_path)))
    assert got.read_bytes() == (tracked["report"] / "curves.png").read_bytes()


def test_trackio_local_store_holds_metrics_jsonl_the_config_and_the_report(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    state = tracked["state"]["trackio"]
    # the run folder's name and a digest of its path: two folders named `run` never share a trackio run
    assert state["project"] == PROJECT and re.fullmatch(r"run-[0-9a-f]{8}", state["run"])
    assert [r["id"] for r in SQLiteStorage.get_run_records(PROJECT)] == [state["id"]]  # resumed, not a second run
    logs = SQLiteStorage.get_logs(PROJECT, run_id=state["id"])
    rows = [{k: v for k, v in row.items() if k != "timestamp"} for row in logs]
    same_series(series(rows), sent(tracked))
    config = SQLiteStorage.get_run_config(PROJECT, state["run"])
    assert {k: v for k, v in config.items() if not k.startswith("_")} == tracked["config"]
    [artifact] = [a for a in SQLiteStorage.list_artifacts(PROJECT) if a["name"] == f"report-{state['id']}"]
    assert artifact["type"] == "report" and artifact["versions"][0]["num_files"] == 2


def test_a_run_stopped_by_an_error_is_marked_failed(tracked, tiny_models, tmp_path):
    """The loop tells its trackers how the run ended (here MLflow, in the file store `tracked` set up)."""
    from mlflow.tracking import MlflowClient

    from prefalign.train.loop import TrainingError

    nan_model(tiny_models["llama"], tmp_path / "nan_model")  # every loss non-finite: the guard stops the run
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    cfg = make_config(method="dpo", model=str(tmp_path / "nan_model"), data=str(pairs), output=str(tmp_path / "run"),
                      max_steps=5, batch_size=4, max_bad_steps=2, reference="copy", report_to=["mlflow"])
    with pytest.raises(TrainingError):
        train(cfg, log=lambda _: None, progress=False)
    state = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FAILED"
    history = client.get_metric_history
    got = {k: sorted((m.step, m.value) for m in history(run.info.run_id, k)) for k in run.data.metrics}
    want = series(rows_of((tmp_path / "run" / "metrics.jsonl").read_text()))
    assert math.isnan(want["grad_norm"][0][1])  # a skipped step's non-finite gradient norm is on record there too
    same_series(got, want)


def test_a_missing_extra_is_a_config_error_naming_it(tiny_models, tmp_path, monkeypatch):
    from prefalign.train.trackers import Trackers

    for name in ("wandb", "mlflow", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import NAME` meets where the package is absent
        with pytest.raises(ConfigError, match=rf"report_to: {name} needs the {name} package: "
                                              rf"pip install 'prefalign\[{name}\]'"):
            train(make_config(method="dpo", model=str(tiny_models["llama"]), data=str(tmp_path / "none.jsonl"),
                              output=str(tmp_path / "run"), report_to=["tensorboard", name]))
        with pytest.raises(ConfigError, match=rf"pip install 'prefalign\[{name}\]'"):  # the import itself
            Trackers([name], {}, tmp_path)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_report_to_values(tmp_path):
    from prefalign.train.loop import RunLog

    cfg = make_config(method="dpo", model="m", data="d", output=str(tmp_path), report_to="wandb,mlflow")
    assert cfg.report_to == ["wandb", "mlflow"] and make_config(method="dpo", model="m", data="d", output="o") \
        .report_to == ["tensorboard"]
    for bad, why in ((["none", "wandb"], "none means no tracker"), (["wandb", "wandb"], "twice"),
                     (["comet"], r"report_to\[0\]: Input should be")):
        with pytest.raises(ConfigError, match=why):
            make_config(method="dpo", model="m", data="d", output="o", report_to=bad)
    log = RunLog(tmp_path, None, cfg=make_config(method="dpo", model="m", data="d", output=str(tmp_path),
                                                 report_to="none"))
    log.write({"step": 1, "loss": math.pi})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no events, no trackers.json


def test_a_twice_interrupted_resume_sends_no_step_twice(tiny_models, tmp_path, monkeypatch):
    """Preempted at step 4 (checkpoint 2), resumed and stopped again at 3, resumed to 5: MLflow holds each
    step once (what a tracker run was sent is kept in trackers.json, not read back from metrics.jsonl,
    which each attempt cuts back to its checkpoint). Then a fresh run without trackers drops trackers.json."""
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    for k, v in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",
                 "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(k, v)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    base = dict(method="dpo", model=str(tiny_models["llama"]), data=str(pairs), batch_size=4, kl_every=0,
                output=str(tmp_path / "run"), save_every=2, report_to=["mlflow"], tracker_project=PROJECT)
    for steps, resume in ((4, False), (3, True), (5, True)):
        train(make_config(**base, max_steps=steps, resume=resume), log=lambda _: None, progress=False)
        for later in (tmp_path / "run" / "checkpoints").glob("step-*"):  # preempted: no checkpoint after step 2
            if int(later.name.split("-")[1]) > 2:
                shutil.rmtree(later)
    state = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    history = MlflowClient(uri).get_metric_history(state["run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5], [m.step for m in history]
    # a fresh run in the same folder (its old checkpoints moved away first, as a fresh start requires)
    shutil.move(tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints.old")
    train(make_config(**{**base, "report_to": ["none"]}, max_steps=1), log=lambda _: None, progress=False)
    assert not (tmp_path / "run" / "trackers.json").exists()


def test_mlflow_default_store_without_sqlalchemy_is_refused_before_the_model_loads(monkeypatch):
    import importlib.util

    from prefalign.train.trackers import check_installed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is unset.*needs SQLAlchemy"):
        check_installed(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    check_installed(["mlflow"])


def test_a_second_wandb_attempt_waits_for_a_folder_name_of_its_own(tmp_path):
    """Two attempts of one W&B run in the same second would share `run-<second>-<id>`; the second waits."""
    from prefalign.train.trackers import _next_second_if_taken

    made = tmp_path / "wandb" / f"offline-run-{time.strftime('%Y%m%d_%H%M%S')}-abc"
    made.mkdir(parents=True)
    _next_second_if_taken(tmp_path / "wandb", "abc")
    assert int(time.time()) > int(made.stat().st_mtime)
    t0 = time.perf_counter()
    _next_second_if_taken(tmp_path / "wandb", "other")  # another run's id: no wait
    assert time.perf_counter() - t0 < 0.1
