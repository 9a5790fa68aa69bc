"""Experiment trackers beside metrics.jsonl (`report_to`, docs/trackers.md): TensorBoard, W&B, MLflow, trackio.

Each tracker gets every metrics.jsonl row under the same keys and step, and the run's resolved config (config.yaml);
`prefalign report` later adds the report's plots to the runs it reads (`attach_report`). metrics.jsonl stays the
record: a tracker is a view of it. Each library is imported when its tracker starts, so commands that log nothing
do not pay for it (mlflow alone costs ~2 s), and a missing one is a ConfigError naming the extra to install.

Where a run lives is stored in RUN/trackers.json (W&B run id, MLflow run id, trackio run), so a resumed run goes
on in the same tracker run and `prefalign report` can find it again. A tracker's own settings come from its own
environment variables (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

STATE = "trackers.json"
# report_to name -> (module imported, what to install)
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install 'prefalign[wandb]'"),
            "mlflow": ("mlflow", "pip install 'prefalign[mlflow]'"),
            "trackio": ("trackio", "pip install 'prefalign[trackio]'")}


def check_installed(report_to: list[str]) -> None:
    """Fail before a model is loaded when a tracker's package is missing (found, not imported: no cost)."""
    for name in report_to:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise ConfigError(f"report_to: {name} needs the {PACKAGES[name][0]} package: {PACKAGES[name][1]}")
    if "mlflow" in report_to:
        check_mlflow_store()


def check_mlflow_store() -> None:
    """MLflow 3's default store, sqlite:///mlflow.db, needs SQLAlchemy, which mlflow-skinny (the extra) lacks:
    say so before any model is loaded rather than when the run's tracker starts."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError("report_to: mlflow: MLFLOW_TRACKING_URI is unset, and MLflow's default store (sqlite:///"
                          "mlflow.db) needs SQLAlchemy (pip install mlflow, the full package); or set "
                          "MLFLOW_TRACKING_URI to a server, or to file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true "
                          "(docs/trackers.md)")


def require(name: str):
    module, install = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"report_to: {name} needs the {module} package ({e}): {install}") from None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def absolute_store(uri: str) -> str:
    """A local MLflow store named relative to the working directory, made absolute: trackers.json must find it
    from wherever `prefalign report` or a resumed run starts."""
    for scheme in ("file:", "sqlite:///"):
        if uri.startswith(scheme) and not uri.startswith(scheme + "/"):
            return scheme + str(Path(uri[len(scheme):]).resolve())
    return uri  # a server, or a bare name (databricks) that is not a path


class Tracker:
    """One tracker's run. `start` opens it (continuing `previous`, what the last attempt stored, when the run
    resumes) and returns what to store for the next attempt; `log` gets a row's numbers; `artifact` files;
    `finish` closes it. `purges`: on resume the tracker itself drops what was logged after the checkpoint."""

    name = ""
    purges = False

    def __init__(self, project: str | None = None):
        self.project, self.reopened = project, False

    def start(self, config: dict[str, Any], name: str, out: Path, previous: dict | None = None,
              resumed_step: int | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def reopen(self, state: dict[str, Any], out: Path) -> None:
        """The run of a finished training (from trackers.json), to add artifacts to."""
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def artifact(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def finish(self, ok: bool = True) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name, purges = "tensorboard", True

    def start(self, config, name, out, previous=None, resumed_step=None):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events an interrupted attempt wrote after the checkpoint; a
        # fresh start (no checkpoint yet, or resume off) hides all of an earlier attempt's, whose event
        # files are still in the folder: else its steps showed twice, beside the new run's
        self.writer = SummaryWriter(str(out), purge_step=0 if resumed_step is None else resumed_step + 1)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```",
                             global_step=resumed_step or 0)
        return {"dir": str(out.resolve())}

    def reopen(self, state, out):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out))  # the events of the folder reported, wherever it is now

    def log(self, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def artifact(self, paths):
        from matplotlib.image import imread

        for p in paths:
            if p.suffix == ".png":  # TensorBoard shows images, not files
                self.writer.add_image(f"report/{p.stem}", imread(p)[..., :3], 0, dataformats="HWC")

    def finish(self, ok=True):
        self.writer.close()


def _next_second_if_taken(folder: Path, run_id: str) -> None:
    """W&B names an attempt's folder `[offline-]run-YYYYMMDD_HHMMSS-<id>`: a second attempt of the same run that
    starts within the same second (a resume, then `prefalign report`, in a script) would write into the first
    one's folder and replace its .wandb file. Wait for the next second then (at most 1 s, and only then)."""
    newest = max((p.stat().st_mtime for p in folder.glob(f"*run-*-{run_id}")), default=None)
    if newest is not None and int(time.time()) <= int(newest):
        time.sleep(min(int(newest) + 1 - time.time() + 0.01, 1.01))  # a folder dated ahead (clock skew): 1 s


class WandB(Tracker):
    name = "wandb"

    def start(self, config, name, out, previous=None, resumed_step=None):
        wandb = require("wandb")
        # the run's files go into the run folder unless WANDB_DIR says where
        where = os.environ.get("WANDB_DIR") or str(out.resolve())
        args: dict[str, Any] = {"id": previous["id"], "resume": "allow"} if previous else {}
        project = self.project or os.environ.get("WANDB_PROJECT") or "prefalign"
        self._init(wandb, project=project, name=name, dir=where, **args)
        self.run.config.update(config, allow_val_change=True)  # on resume: the resumed attempt's config
        return {"id": self.run.id, "project": project, "dir": where}

    def _init(self, wandb, **kwargs) -> None:
        if kwargs.get("id") and kwargs.get("dir"):
            _next_second_if_taken(Path(kwargs["dir"]) / "wandb", kwargs["id"])
        try:  # create_new: a run of the caller's own (a notebook's wandb.run) is left alone
            self.run = wandb.init(reinit="create_new", **kwargs)
        except Exception as e:
            raise ConfigError(f"report_to: wandb could not start a run ({type(e).__name__}: {e}); log in "
                              "(`wandb login`) or log locally with WANDB_MODE=offline") from None

    def reopen(self, state, out):
        self._init(require("wandb"), id=state["id"], project=state.get("project"), dir=state.get("dir"),
                   resume="allow")

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def artifact(self, paths):
        import wandb

        art = wandb.Artifact(f"report-{self.run.id}", type="report")
        for p in paths:
            art.add_file(str(p))
        self.run.log_artifact(art)

    def finish(self, ok=True):
        import wandb

        self.run.finish(exit_code=0 if ok else 1)
        if wandb.run is None:  # no run of the caller's: stop the wandb-core process now, not at exit
            wandb.teardown()


class MLflow(Tracker):
    name = "mlflow"

    def _client(self, uri: str | None = None):
        mlflow = require("mlflow")
        from mlflow.tracking import MlflowClient

        uri = uri or absolute_store(mlflow.get_tracking_uri())  # MLFLOW_TRACKING_URI, else mlflow's default
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # opens the store: a bad URI fails here, not mid-run
        except Exception as e:
            raise ConfigError(f"report_to: mlflow cannot open its tracking store {uri} ({type(e).__name__}: {e}); "
                              "set MLFLOW_TRACKING_URI (a server URL, sqlite:///FILE with the full mlflow, or "
                              "file:DIR with MLFLOW_ALLOW_FILE_STORE=true)") from None
        return client, uri

    def start(self, config, name, out, previous=None, resumed_step=None):
        from mlflow.entities import Param

        self.client, uri = self._client()
        if previous and previous.get("tracking_uri") == uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "prefalign"
            found = self.client.get_experiment_by_name(experiment)
            eid = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(eid, run_name=name).info.run_id
            # params cannot change once logged: a resumed run keeps the first attempt's
            params = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes 100 params a batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")  # the attempt's config, replaced on resume
        return {"tracking_uri": uri, "run_id": self.run_id}

    def reopen(self, state, out):
        self.client, self.run_id, self.reopened = self._client(state["tracking_uri"])[0], state["run_id"], True

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def artifact(self, paths):
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), "report")

    def finish(self, ok=True):
        if self.reopened:  # the training's own end set its status
            return
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Trackio(Tracker):
    name = "trackio"

    def start(self, config, name, out, previous=None, resumed_step=None):
        trackio = require("trackio")
        project = self.project or "prefalign"
        # trackio finds a run by its name: runs/a/dpo and runs/b/dpo (or every iterate round's `train`) must
        # not share one, so the name carries a digest of the folder's absolute path
        unique = f"{name}-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]}"
        with contextlib.redirect_stdout(sys.stderr):  # trackio prints; stdout is for a command's results
            self.run = trackio.init(project=project, name=previous["run"] if previous else unique, config=config,
                                    resume="allow" if previous else "never")
        if previous and previous.get("project") == project:
            self._check(previous)
        return {"project": project, "run": self.run.name, "id": self.run.id}

    def _check(self, state):
        if getattr(self.run, "id", None) != state.get("id"):
            raise ConfigError(f"trackio: project {state.get('project')} run {state.get('run')} is not the run this "
                              f"folder logged to (id {self.run.id}, trackers.json has {state.get('id')})")

    def reopen(self, state, out):
        trackio = require("trackio")
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(project=state["project"], name=state["run"], resume="must")
        self._check(state)

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def artifact(self, paths):
        import trackio

        art = trackio.Artifact(f"report-{self.run.id}", type="report")
        for p in paths:
            art.add_file(p)
        self.run.log_artifact(art)

    def finish(self, ok=True):
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            if trackio.context_vars.current_run.get() is self.run:
                trackio.finish()  # also clears trackio's current run, which it would otherwise finish again at exit
            else:
                self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, WandB, MLflow, Trackio)}


def same_run(previous: dict[str, Any] | None, now: dict[str, Any]) -> bool:
    """Whether a tracker went on in the run an earlier attempt logged to, not a new one (another store or
    project), by the run id both recorded (W&B and trackio: id; MLflow: run_id)."""
    ids = [k for k in ("id", "run_id") if k in now]
    return bool(previous) and bool(ids) and all(previous.get(k) == now[k] for k in ids)


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's values a tracker can plot: every number but `step`, the x axis (a NaN too: a
    skipped step's non-finite loss is on record in every tracker as in metrics.jsonl)."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The run's trackers, fed every metrics.jsonl row (RunLog). On resume from the checkpoint of step N after
    an attempt that logged up to step M, a tracker that goes on in the same run gets only steps after M: W&B,
    MLflow and trackio keep what they were sent for N+1..M rather than hold it twice (TensorBoard purges
    it and takes the new rows)."""

    def __init__(self, report_to: list[str], config: dict[str, Any], out: Path, project: str | None = None,
                 resumed_step: int | None = None, logged_until: int | None = None,
                 log: Callable[[str], None] = print):
        self.active: list[tuple[Tracker, int]] = []  # (tracker, the last step it already has)
        self.log_line = log
        previous = read_state(out) if resumed_step is not None else {}
        state = dict(previous)
        try:
            for name in report_to:
                tracker = TRACKERS[name](project)
                state[name] = tracker.start(config, out.name, out, previous.get(name), resumed_step)
                goes_on = not tracker.purges and same_run(previous.get(name), state[name])
                # the last step this tracker run was sent, by any earlier attempt (an attempt that failed
                # before passing it again still counts), at least what metrics.jsonl shows was logged
                has = max(previous[name].get("sent", -1), logged_until or -1) if goes_on else -1
                state[name]["sent"] = has
                if goes_on and has > resumed_step:
                    span = f"steps {resumed_step + 1}-{has}" if has > resumed_step + 1 else f"step {has}"
                    log(f"{name}: resumed at step {resumed_step}; {span}, logged before the interruption, keeps "
                        "its first values there (metrics.jsonl has the re-run's)")
                self.active.append((tracker, has))
        except BaseException:
            self.finish(ok=False)
            raise
        self.path, self.state = out / STATE, state
        if report_to:
            self.path.write_text(json.dumps(state, indent=2))
        elif resumed_step is None:
            self.path.unlink(missing_ok=True)  # a fresh run without trackers: no earlier run's to attach to

    def write(self, row: dict[str, Any]) -> None:
        metrics, sent = numbers(row), False
        for i, (tracker, has) in enumerate(self.active):
            if row["step"] > has:
                tracker.log(row["step"], metrics)
                self.active[i] = (tracker, row["step"])
                self.state[tracker.name]["sent"] = row["step"]
                sent = True
        if sent and any(t.name != "tensorboard" for t, _ in self.active):  # what a resume must not send again
            self.path.write_text(json.dumps(self.state, indent=2))

    def finish(self, ok: bool = True) -> None:
        for tracker, _ in self.active:
            try:  # one tracker failing to close must not keep the others open
                tracker.finish(ok)
            except Exception as e:
                self.log_line(f"{tracker.name}: could not finish its run: {type(e).__name__}: {e}")
        self.active = []


def attach_report(folders: list[str | Path], paths: list[Path], log: Callable[[str], None] = print) -> int:
    """Add the report's files (its plots, report.html) to the tracker runs of the training folders it read
    (their trackers.json). Returns how many tracker runs got them."""
    done = 0
    for folder in map(Path, folders):
        for name, state in read_state(folder).items():
            if name not in TRACKERS:
                continue
            tracker = TRACKERS[name]()
            try:  # the report is written: a tracker run that is gone or out of reach is reported, not fatal
                tracker.reopen(state, folder)
                try:
                    tracker.artifact(paths)
                finally:
                    tracker.finish()
                done += 1
            except Exception as e:
                log(f"{folder}: could not add the report to its {name} run: {type(e).__name__}: {e}")
    if done:
        log(f"report: plots added to {done} tracker runs")
    return done
