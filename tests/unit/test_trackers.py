"""Experiment trackers (`report_to`): every scalar keel writes to metrics.jsonl reaches the tracker
at its step, with the run's config; read back from TensorBoard's own event files (and from W&B,
MLflow and Trackio where those optional extras are installed)."""

import importlib.util
import json
import struct
import sys
import time

import pytest
from google.protobuf.message import DecodeError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # keel[test] installs it

from keel.config import RLConfig, SFTConfig
from keel.errors import KeelError
from keel.models import init_model
from keel.runlog import RunLog, read_jsonl
from keel.trackers import TensorBoardTracker, open_trackers, scalars
from keel.train.sft import sft

def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_config(log_dir) -> dict:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    [event] = acc.Tensors("config/text_summary")
    return json.loads(event.tensor_proto.string_val[0].decode().strip("`\n"))


def expected_scalars(rows) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers per key, as (step, value); text, null and the step itself are not scalars."""
    out = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def assert_same_scalars(got, want):
    assert sorted(got) == sorted(want)
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 there


@pytest.fixture(scope="module")
def tiny():
    return init_model("qwen3", layers=1, hidden=32, seed=0)


def tiny_sft(tiny, out, **changes):
    model, tokenizer = tiny
    cfg = SFTConfig(task="arithmetic", task_options={"digits": 1}, examples=40, steps=3, batch_tokens=256,
                    warmup=0, device="cpu", **changes)
    sft(model, tokenizer, cfg, out)
    return cfg


def test_tensorboard_gets_every_scalar_of_metrics_jsonl_and_the_config(tmp_path, tiny, one_thread):
    cfg = tiny_sft(tiny, tmp_path, report_to=["tensorboard"])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    want = expected_scalars(rows)
    assert {"loss", "grad_norm", "lr", "tokens", "tokens_per_s"} <= set(want)
    assert_same_scalars(tensorboard_scalars(tmp_path / "tensorboard" / "sft"), want)
    config = tensorboard_config(tmp_path / "tensorboard" / "sft")
    assert config["stage"] == "sft" and config["steps"] == cfg.steps == 3 and config["lr"] == cfg.lr
    assert config["task_options"] == {"digits": 1} and config["report_to"] == ["tensorboard"]


def test_tensorboard_drops_the_steps_a_rewound_run_writes_again(tmp_path):
    cfg = SFTConfig(report_to="tensorboard")
    log = RunLog(tmp_path, trackers=open_trackers(cfg, tmp_path, "rl"))
    log.truncate("rl", 0)  # what a fresh start does
    for step in (1, 2, 3, 4):
        log.metrics({"stage": "rl", "step": step, "reward": step / 10, "skipped": None})
    log.truncate("rl", 2)  # a rollback to the checkpoint of step 2: steps 3 and 4 come again
    for step in (3, 4, 5):
        log.metrics({"stage": "rl", "step": step, "reward": step, "eval": {"pass@1": 0.5}})
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["reward"] for r in rows] == [0.1, 0.2, 3, 4, 5]
    got = tensorboard_scalars(tmp_path / "tensorboard" / "rl")
    assert_same_scalars(got, {"reward": [(1, 0.1), (2, 0.2), (3, 3.0), (4, 4.0), (5, 5.0)],
                              "eval/pass@1": [(3, 0.5), (4, 0.5), (5, 0.5)]})  # nested values flatten to "a/b"


def test_scalars_are_the_numbers_of_a_row():
    row = {"stage": "rl", "step": 7, "loss": 0.5, "tokens": 12, "kl": None, "grad_norm": float("nan"),
           "skipped": "spike", "eval": {"pass@1": 0.25, "n": 4}}
    assert scalars(row) == {"loss": 0.5, "tokens": 12.0, "eval/pass@1": 0.25, "eval/n": 4.0}


def test_report_to_names_are_checked_where_the_config_is_built():
    assert SFTConfig(report_to="tensorboard, wandb").report_to == ("tensorboard", "wandb")
    assert SFTConfig(report_to=["mlflow"]).report_to == ("mlflow",) and SFTConfig().report_to == ()
    with pytest.raises(KeelError, match="unknown tracker 'tensorbord'.*tensorboard, wandb, trackio, mlflow") as e:
        SFTConfig(report_to=["tensorbord"])
    assert e.value.field == "report_to"


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("trackio", "trackio"),
                                          ("mlflow", "mlflow")])
def test_a_missing_tracker_library_names_the_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package gives
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(KeelError, match=rf"report_to {name}: the {name} package is not installed; "
                                        rf"pip install 'keel\[{name}\]'"):
        open_trackers(SFTConfig(report_to=["tensorboard", name]), tmp_path, "sft")


class Broken:
    """A tracker whose service went away."""

    def log(self, values, step):
        raise ConnectionError("server gone")

    def rewind(self, step):
        pass

    def close(self):
        pass


def test_a_failing_tracker_does_not_stop_the_run(tmp_path):
    tensorboard = TensorBoardTracker(tmp_path, "sft", {"lr": 1.0})
    log = RunLog(tmp_path, trackers=[Broken(), tensorboard])
    log.metrics({"stage": "sft", "step": 1, "loss": 2.0})
    log.metrics({"stage": "sft", "step": 2, "loss": 1.0})
    log.close()
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2.0, 1.0]
    [event] = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "tracker_failed"]
    assert event["tracker"] == "Broken" and "server gone" in event["error"]
    assert tensorboard_scalars(tmp_path / "tensorboard" / "sft") == {"loss": [(1, 2.0), (2, 1.0)]}


# ---- W&B (in keel[test]), MLflow and Trackio (optional extras, skipped where not installed) -------


ROWS = [{"stage": "rl", "step": 1, "reward": 0.25, "kl": None, "skipped": "spike", "test_pass@1": 0.5},
        {"stage": "rl", "step": 2, "reward": 0.75, "tokens": 96, "eval": {"pass@1": 0.5}}]
WANT = {"reward": [(1, 0.25), (2, 0.75)], "test_pass@1": [(1, 0.5)], "tokens": [(2, 96.0)], "eval/pass@1": [(2, 0.5)]}


def log_rows(tmp_path, tracker: str) -> RLConfig:
    """ROWS through a RunLog with `tracker`; the config it was given."""
    cfg = RLConfig(report_to=[tracker], steps=2, task_options={"digits": 2})
    log = RunLog(tmp_path, trackers=open_trackers(cfg, tmp_path, "rl"))
    for row in ROWS:
        log.metrics(row)
    log.close()
    return cfg


def wandb_records(path):
    """The records of a .wandb file. Its framing is LevelDB's log format: a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last); the payloads are wandb's protobuf Records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_gets_every_scalar_and_the_config(tmp_path, monkeypatch):
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "cfg"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))
    log_rows(tmp_path, "wandb")
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    for _ in range(300):  # run.finish() can return before wandb's service has written the file out
        try:
            records = list(wandb_records(run_file))
        except DecodeError:  # a record half written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    got, config = {}, {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    got.setdefault(key, []).append((record.history.step.num, value))
        elif record.WhichOneof("record_type") == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    assert_same_scalars(got, WANT)
    assert config["steps"] == 2 and config["task_options"] == {"digits": 2}
    assert config["stage"] == "rl" and config["report_to"] == ["wandb"]


def test_mlflow_gets_every_scalar_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="optional extra keel[mlflow], not in keel[test]")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = log_rows(tmp_path, "mlflow")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("keel").experiment_id])
    assert run.info.run_name == f"{tmp_path.name}-rl" and run.info.status == "FINISHED"
    got = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
           for key in run.data.metrics}
    assert_same_scalars(got, {k.replace("@", "_"): v for k, v in WANT.items()})  # MLflow names allow no "@"
    params = run.data.params
    assert params["steps"] == "2" and params["task_options.digits"] == "2" and params["stage"] == "rl"
    assert params["resilience.keep"] == str(cfg.resilience.keep)


def test_trackio_gets_every_scalar_and_the_config(tmp_path, monkeypatch):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("optional extra keel[trackio], not in keel[test]")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    monkeypatch.setenv("TRACKIO_PROJECT", f"keel-test-{tmp_path.name}")
    log_rows(tmp_path, "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    project, run = f"keel-test-{tmp_path.name}", f"{tmp_path.name}-rl"
    try:
        got = {}
        for entry in SQLiteStorage.get_logs(project, run):
            for key, value in entry.items():
                if key not in ("step", "timestamp"):
                    got.setdefault(key, []).append((entry["step"], value))
        assert_same_scalars(got, WANT)
        config = SQLiteStorage.get_run_config(project, run)
        assert config["steps"] == 2 and config["task_options"] == {"digits": 2} and config["stage"] == "rl"
    finally:
        import trackio

        trackio.delete_project(project, force=True)
