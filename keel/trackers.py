"""Experiment trackers (`report_to: [tensorboard, wandb, trackio, mlflow]`): the metrics rows keel
writes to metrics.jsonl, and the run's config, also go to the tracker a person watches runs in.

metrics.jsonl stays the source of truth; a tracker gets each row's numbers as the row is written
(rank 0 only), under the row's step, one tracker run per stage. Every tracker works offline:
TensorBoard writes event files to OUT/tensorboard/<stage>; W&B honours WANDB_MODE (offline: files
in OUT/wandb to `wandb sync` later); Trackio keeps its local database (TRACKIO_DIR); MLflow logs to
MLFLOW_TRACKING_URI, else to the SQLite database OUT/mlflow.db (`mlflow ui --backend-store-uri
sqlite:///OUT/mlflow.db`). The tracker libraries are optional extras, imported only when asked for.

When a run rewinds (a resume, a spike rollback), the rows after the checkpoint are written again:
TensorBoard hides the old ones (purge_step); W&B keeps the first value of a step, MLflow and
Trackio show both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Protocol

from keel.errors import KeelError

_MLFLOW_NAME = re.compile(r"[^\w\-. :/]")  # what MLflow refuses in a metric name ("test_pass@1" -> "test_pass_1")
PROJECT = "keel"  # W&B project, Trackio project and MLflow experiment unless the environment names one


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None:
        """Record a row's numbers at `step`."""
        ...

    def rewind(self, step: int) -> None:
        """The rows after `step` will be written again (a resumed or rolled-back run)."""
        ...

    def close(self) -> None:
        ...


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row, nested dicts flattened to "a/b"; the step itself, text, None and
    non-finite values left out (metrics.jsonl writes those as null)."""
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and name != "step" and math.isfinite(value):
            out[name] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as "section.key" -> text, for trackers whose parameters are flat strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def _library(name: str):
    """The module tracker `name` needs; each is an optional extra of keel, named like the tracker."""
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise KeelError(f"report_to {name}: the {name} package is not installed; pip install 'keel[{name}]'",
                        field="report_to") from None


class TensorBoardTracker:
    """Event files in OUT/tensorboard/<stage> through torch's SummaryWriter; the config as text."""

    def __init__(self, out: Path, stage: str, config: dict):
        self.writer_class = _library("tensorboard").SummaryWriter
        self.log_dir = str(Path(out) / "tensorboard" / stage)
        self.config_text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer, self.purge_step = None, None

    def _writer(self):
        """The open writer; a new one (a new event file) after a rewind."""
        if self.writer is None:
            self.writer = self.writer_class(self.log_dir, flush_secs=10, purge_step=self.purge_step)
            if self.config_text:
                self.writer.add_text("config", self.config_text, 0)
                self.config_text = None
        return self.writer

    def log(self, values, step):
        writer = self._writer()
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def rewind(self, step):
        # An event file that starts at step + 1 makes TensorBoard drop the later steps of earlier files.
        if self.writer is not None:
            self.writer.close()
        self.writer, self.purge_step = None, step + 1

    def close(self):
        self._writer().close()


class WandbTracker:
    """A W&B run per stage, files in OUT/wandb; WANDB_MODE=offline logs without an account."""

    def __init__(self, out: Path, stage: str, config: dict):
        wandb = _library("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=f"{Path(out).name}-{stage}",
                              group=Path(out).name, job_type=stage, dir=str(out), config=config,
                              settings=wandb.Settings(console="off", silent=True), reinit="create_new")

    def log(self, values, step):
        self.run.log(values, step=step)

    def rewind(self, step):
        pass  # W&B steps only go forward: it keeps the first value logged at a step

    def close(self):
        self.run.finish()


class TrackioTracker:
    """A Trackio run per stage in its local database (TRACKIO_DIR); `trackio show` opens it. Trackio
    prints its notices to stdout, which keel keeps for results: they go to stderr."""

    def __init__(self, out: Path, stage: str, config: dict):
        trackio = _library("trackio")
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT),
                                    name=f"{Path(out).name}-{stage}", group=Path(out).name, config=config, embed=False)

    def log(self, values, step):
        self.run.log(values, step=step)

    def rewind(self, step):
        pass

    def close(self):
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()


class MLflowTracker:
    """An MLflow run per stage, through a client (no global active run): the config as parameters."""

    def __init__(self, out: Path, stage: str, config: dict):
        mlflow = _library("mlflow")
        self.entities = importlib.import_module("mlflow.entities")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=f"{Path(out).name}-{stage}").info.run_id
        params = [self.entities.Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, values, step):
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(_MLFLOW_NAME.sub("_", k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def rewind(self, step):
        pass

    def close(self):
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
            "mlflow": MLflowTracker}


def check_report_to(names) -> tuple[str, ...]:
    """`report_to` (a list, or a string of comma-separated names) as a tuple of tracker names;
    KeelError naming the known ones otherwise."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(names)
    unknown = [n for n in names if not isinstance(n, str) or n not in TRACKERS]
    if unknown:
        raise KeelError(f"report_to: unknown tracker {', '.join(map(repr, unknown))}: use any of "
                        f"{', '.join(TRACKERS)}", field="report_to")
    return names


def open_trackers(cfg, out: str | Path, stage: str) -> list[Tracker]:
    """The trackers `cfg.report_to` names, for `stage` of the run in `out`, each given the stage's
    config `cfg` (a dataclass); a missing library fails before any of them starts."""
    names = tuple(dict.fromkeys(check_report_to(cfg.report_to)))
    for name in names:
        _library(name)
    config = {**json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), "stage": stage, "out": str(out)}
    started = []
    for name in names:
        try:
            started.append(TRACKERS[name](Path(out), stage, config))
        except Exception as e:  # e.g. W&B online without a login: say so in one line, leave nothing open
            for tracker in started:
                tracker.close()
            raise KeelError(f"report_to {name} could not start ({type(e).__name__}: {e})".replace("\n", " "),
                            field="report_to") from None
    return started
