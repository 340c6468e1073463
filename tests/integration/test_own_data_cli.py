"""A user's own data through `keel sft` and `keel rl`: GSM8K-style rows (the working before "####"
is the SFT trace), with the metrics also going to TensorBoard (`--report-to`), from rank 0 only."""

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # keel[test] installs it

from keel.runlog import read_jsonl
from tests.integration.test_cli import ROOT, keel


def gsm8k_rows(n):
    """GSM8K's shape: a word problem, then working with calculator notes and "#### answer"."""
    return [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?",
             "answer": f"Tom has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}"}
            for i in range(n)]


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_has_every_scalar(log_dir, rows):
    got = tensorboard_scalars(log_dir)
    want = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                want.setdefault(key, []).append((row["step"], float(value)))
    assert sorted(got) == sorted(want)
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    r = keel("init-model", "--arch", "llama", "--layers", "1", "--hidden", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_gsm8k_rows_train_sft_and_rl_with_tensorboard(tmp_path, tiny_model):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in gsm8k_rows(40)))
    # SFT on two ranks (torchrun, gloo): rank 0 alone writes the metrics and reports them
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "keel", "sft",
                        "--model", str(tiny_model), "--out", "sft", "--task", str(data), "--steps", "2",
                        "--recipe", str(write(tmp_path / "sft.yaml", "examples: 16\nbatch_tokens: 512\n")),
                        "--report-to", "tensorboard"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr  # the landed code stopped here: "no reasoning traces"
    rows = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2] and all(row["tokens"] > 0 for row in rows)
    assert (tmp_path / "sft" / "model" / "config.json").is_file()
    assert len(list((tmp_path / "sft" / "tensorboard" / "sft").iterdir())) == 1  # one event file, rank 0's
    assert (tmp_path / "sft" / "rank1").is_dir() and not list((tmp_path / "sft" / "rank1").rglob("*tfevents*"))
    assert_tensorboard_has_every_scalar(tmp_path / "sft" / "tensorboard" / "sft", rows)

    recipe = write(tmp_path / "rl.yaml", "prompts_per_step: 4\ngroup_size: 2\nmax_new_tokens: 8\n")
    r = keel("rl", "--model", tmp_path / "sft" / "model", "--out", tmp_path / "rl", "--task", data, "--steps", "2",
             "--recipe", recipe, "--report-to", "tensorboard")
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2] and "reward" in rows[0]
    assert_tensorboard_has_every_scalar(tmp_path / "rl" / "tensorboard" / "rl", rows)


def test_unknown_tracker_flag_is_one_line(tmp_path, tiny_model):
    r = keel("sft", "--model", tiny_model, "--out", tmp_path / "run", "--report-to", "tensorbord")
    assert r.returncode == 2 and "unknown tracker 'tensorbord'" in r.stderr and "(--report-to)" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def write(path, text):
    path.write_text(text)
    return path
