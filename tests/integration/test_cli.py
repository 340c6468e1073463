"""The `keel` command end to end: bad input gets one line, exit status 2, and nothing written."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def keel(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "keel", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    r = keel("init-model", "--arch", "llama", "--layers", "1", "--hidden", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return out


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_dir(tmp_path):
    out = tmp_path / "run"
    r = keel("rl", "--model", tmp_path / "nope", "--out", out)
    assert_one_line_error(r, "does not exist", "keel init-model")
    assert not out.exists()


def test_invalid_model_dir(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.txt").write_text("hello")
    out = tmp_path / "run"
    r = keel("sft", "--model", tmp_path / "notamodel", "--out", out)
    assert_one_line_error(r, "no config.json")
    assert not out.exists()


def test_recipe_with_unknown_key(tmp_path, tiny_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 3\nlearning_rate: 0.1\n")
    out = tmp_path / "run"
    r = keel("rl", "--model", tiny_model, "--out", out, "--recipe", recipe)
    assert_one_line_error(r, "unknown key 'learning_rate'")
    assert not out.exists()


def test_recipe_out_of_range(tmp_path, tiny_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("top_p: 1.5\n")
    r = keel("rl", "--model", tiny_model, "--out", tmp_path / "run", "--recipe", recipe)
    assert_one_line_error(r, "top_p must be in (0, 1]")
    assert not (tmp_path / "run").exists()


def test_group_size_of_one(tmp_path, tiny_model):
    r = keel("rl", "--model", tiny_model, "--out", tmp_path / "run", "--group-size", "1")
    assert_one_line_error(r, "group_size must be >= 2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needle", [(["--simulate-link", "fast"], "GBPS[,LATENCY_MS]"),
                                           (["--simulate-link", "-1"], "link_gbps and link_latency_ms must be >= 0"),
                                           (["--sync", "allreduce"], "unknown sync 'allreduce'")])
def test_bad_distributed_flags(tmp_path, tiny_model, flags, needle):
    r = keel("rl", "--model", tiny_model, "--out", tmp_path / "run", *flags)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "run").exists()


def test_dataset_without_the_named_columns(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "solution": "2"}) + "\n")
    r = keel("sft", "--model", tiny_model, "--out", tmp_path / "run", "--task", data)
    assert_one_line_error(r, "question")
    assert not (tmp_path / "run").exists()


def test_library_errors_name_the_flag_of_the_command_that_was_run(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "solution": "2"}) + "\n")
    # keel sft has no --question-key: the column is a task option there
    r = keel("sft", "--model", tiny_model, "--out", tmp_path / "run", "--task", data)
    assert_one_line_error(r, "(-o question_key=VALUE)")
    assert "--question-key" not in r.stderr
    r = keel("label", "--model", tiny_model, "--questions", data, "--out", tmp_path / "l.jsonl")
    assert_one_line_error(r, "(--question-key)")
    assert not (tmp_path / "l.jsonl").exists()


def test_unknown_task_and_bad_option(tmp_path):
    r = keel("data", "--task", "chess", "--out", tmp_path / "x.jsonl")
    assert_one_line_error(r, "chess")
    r = keel("data", "--task", "arithmetic", "--out", tmp_path / "x.jsonl", "-o", "digits")
    assert_one_line_error(r, "KEY=VALUE")
    assert not (tmp_path / "x.jsonl").exists()


def test_data_writes_rows_with_traces(tmp_path):
    out = tmp_path / "rows.jsonl"
    r = keel("data", "--task", "countdown", "--split", "test", "--n", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    assert {"question", "answer", "trace", "numbers", "target"} <= set(rows[0])


def test_eval_prints_the_librarys_numbers(tiny_model):
    r = keel("eval", "--model", tiny_model, "--task", "arithmetic", "--n", "4", "--k", "2", "-o", "digits=1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    from keel.config import EvalConfig
    from keel.evaluate import evaluate
    from keel.models import load_model

    model, tokenizer = load_model(tiny_model)
    expected = evaluate(model, tokenizer, EvalConfig(task_options={"digits": 1}, n=4, k=2, device="cpu"))
    expected.pop("examples")
    assert result == expected  # the flags reach the library: same problems, same seed, same counts
    assert set(result) == {"n", "pass@1", "format", "pass@2", "sampled_accuracy"} and result["n"] == 4


def test_sft_then_rl_write_hf_models(tmp_path, tiny_model):
    r = keel("sft", "--model", tiny_model, "--out", tmp_path / "sft", "--steps", "2", "-o", "digits=2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()
    r = keel("rl", "--model", tmp_path / "sft" / "model", "--out", tmp_path / "rl", "--steps", "2",
             "--loss", "dapo", "-o", "digits=1")  # a tiny task: the prompt pool shrinks to fit
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:  # this model's groups have signal (DAPO's overlong penalty): no step may be skipped
        assert "skipped" not in row, row
        for key in ("reward_correct", "reward_format", "accuracy", "response_length", "clip_frac", "kl",
                    "entropy", "grad_norm", "tokens_per_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
        assert 0 <= row["accuracy"] <= 1 and row["grad_norm"] > 0 and row["tokens_per_s"] > 0
    assert (tmp_path / "rl" / "model" / "config.json").is_file()
    # a finished run is not overwritten by accident
    r = keel("rl", "--model", tmp_path / "sft" / "model", "--out", tmp_path / "rl", "--steps", "1")
    assert_one_line_error(r, "already exists")


def test_usage_errors_exit_2_without_a_traceback():
    for args in (["nosuch"], ["rl", "--bogus", "1"]):
        r = keel(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "Error:" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- out folders (issue 17, item 8)


def test_init_model_never_deletes_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    r = keel("init-model", "--layers", "1", "--hidden", "32", "--out", out)
    assert_one_line_error(r, str(out), "--overwrite")
    assert (out / "thesis.tex").read_text() == "years of work" and [p.name for p in tmp_path.iterdir()] == ["mine"]
    r = keel("init-model", "--layers", "1", "--hidden", "32", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and not (out / "thesis.tex").exists()


def test_export_never_replaces_its_input(tiny_model):
    before = {p.name: p.read_bytes() for p in tiny_model.iterdir()}
    r = keel("export", "--model", tiny_model, "--out", tiny_model)
    assert_one_line_error(r, "would replace the input")
    r = keel("export", "--model", tiny_model, "--out", tiny_model.parent, "--overwrite")  # a folder holding it
    assert_one_line_error(r, "would replace the input")
    assert {p.name: p.read_bytes() for p in tiny_model.iterdir()} == before


# ----------------------------------------------------------------------------- broken models (issue 17, item 9)


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for name in ("null_config", "wrong_type", "truncated"):
        folders[name] = root / name
        shutil.copytree(tiny_model, folders[name])
    (folders["null_config"] / "config.json").write_text("null")
    config = json.loads((tiny_model / "config.json").read_text())
    (folders["wrong_type"] / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    weights = folders["truncated"] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    return folders


@pytest.mark.parametrize("broken, command, names", [
    ("null_config", ["eval", "--n", "1"], "config.json"),
    ("wrong_type", ["sft", "--out", "{tmp}/run", "--steps", "1"], "config.json"),
    ("truncated", ["export", "--out", "{tmp}/onnx"], "model.safetensors"),
    ("null_config", ["label", "--questions", "{tmp}/q.jsonl", "--out", "{tmp}/l.jsonl"], "config.json"),
    ("truncated", ["serve", "--port", "0"], "model.safetensors"),
])
def test_a_broken_model_folder_is_one_line_naming_the_file(tmp_path, broken_models, broken, command, names):
    """Every command loads models through keel.models.load_model (serve, chat and parity through
    engine.backends): one command per way in."""
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    r = keel(args[0], "--model", broken_models[broken], *args[1:])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(broken_models[broken] / names) in errors[0], r.stderr  # (progress lines aside)
