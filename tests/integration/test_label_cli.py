"""`keel label` with a tiny model: labels, resume after SIGKILL, review, bad input, expert iteration."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.config import EvalConfig, ExpertIterationConfig, LabelConfig, SFTConfig
from keel.errors import KeelError
from keel.label import LabelFiles, label_file, read_rows, write_rows
from keel.models import init_model, save_model
from keel.train.sft import sft
from keel.tasks import get_task
from keel.tasks.verify import answers_match, extract_answer

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def keel(*args, **kw):
    return subprocess.run([sys.executable, "-m", "keel", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# One torch thread (tests/conftest.py), as in the subprocesses (OMP_NUM_THREADS=1): the same float
# sums, so an in-process run and a command-line run sample the same traces.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A 2-layer Qwen3 SFT'd for 60 steps on 1-digit sums: R1 format, answers often wrong (fine:
    the verifier judges labels, not the model)."""
    model, tokenizer = init_model("qwen3", layers=2, hidden=64, seed=0)
    run = tmp_path_factory.mktemp("sft")
    sft(model, tokenizer, SFTConfig(task_options={"digits": 1}, examples=40, steps=60, batch_tokens=512, lr=1e-2,
                                    warmup=5, device="cpu"), run)
    save_model(model, tokenizer, run / "model")
    return run / "model"


def write_questions(path, n, digits=2, hide_every=2):
    """n train questions; every `hide_every`-th keeps its answer, the rest are unlabelled. An `id`
    field rides along."""
    rows = []
    for i, ex in enumerate(get_task("arithmetic", digits=digits).examples("train", n, seed=3)):
        rows.append({"question": ex.question, "id": i, **({"answer": ex.answer} if i % hide_every == 0 else {})})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def all_rows(out):
    files = LabelFiles.at(out)
    return read_rows(files.out), read_rows(files.unlabelled)


CFG = LabelConfig(k=4, max_new_tokens=24, batch_questions=4, device="cpu")


def test_labels_from_a_tiny_model(tiny, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", 24, digits=1)  # the sums the model was tuned on
    out = tmp_path / "labels.jsonl"
    summary = label_file(tiny, tmp_path / "q.jsonl", out, CFG)
    rows, unlabelled = all_rows(out)
    assert sorted(r["id"] for r in rows + unlabelled) == list(range(24))  # each question once, fields kept
    assert summary["questions"] == 24 and summary["verified"] + summary["unverified"] == 12
    assert summary["majority"] + summary["unlabelled"] == 12 and Path(summary["plot"]).stat().st_size > 0
    by_id = {q["id"]: q for q in questions}
    for r in rows:
        assert 0 <= r["accepted"] <= 4 and r["confidence"] == r["accepted"] / 4 and r["samples"] == 4
        assert len(r["input_sha256"]) == 64 and len(r["model_sha256"]) == 64 and r["created"]
        assert r["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24, "k": 4, "seed": 0}
        if "answer" in by_id[r["id"]]:
            assert r["answer"] == by_id[r["id"]]["answer"]
            if r["accepted"]:  # verified: a sample reached the reference, and the trace is one of them
                assert r["method"] == "verified" and not r["flagged"]
                assert answers_match(extract_answer(r["trace"]), r["answer"])
            else:  # issue 18: no "verified" row without an accepted sample; it goes to review
                assert (r["method"], r["trace"], r["flagged"], r["flag_reason"]) == (
                    "unverified", None, True, "no sample verified")
        else:
            assert r["method"] == "majority" and r["answer"] == extract_answer(r["trace"]).strip()
            assert r["flagged"] == (r["flag_reason"] is not None)
            assert r["flagged"] or r["confidence"] >= 0.5
    assert all(r["answer"] is None and r["flag_reason"] == "no answer" for r in unlabelled)
    assert any(r["trace"] for r in rows if r["method"] == "verified")  # rejection sampling accepted something
    assert summary["unverified"] > 0  # and missed some: the case above is exercised

    # ready for `keel sft` / `keel rl`: a FileTask reads it, the traced rows become SFT examples
    task = get_task(str(out), test_fraction=0.0)
    assert len(task.examples("train", len(rows))) == len(rows)

    before = out.read_bytes()
    again = label_file(tiny, tmp_path / "q.jsonl", out, CFG)  # same arguments: nothing left to do
    assert out.read_bytes() == before and again["questions"] == 24


def test_parquet_with_all_traces(tiny, tmp_path):
    write_questions(tmp_path / "q.jsonl", 8, digits=1, hide_every=1)  # all verified
    out = tmp_path / "labels.parquet"
    summary = label_file(tiny, tmp_path / "q.jsonl", out, LabelConfig(k=6, max_new_tokens=24, all_traces=True, device="cpu"),
                         fmt="parquet")
    rows = read_rows(out)
    assert not LabelFiles.at(out).journal.exists() and summary["rows"] == len(rows) >= 8
    groups = {}
    for r in rows:
        groups.setdefault(r["input_sha256"], []).append(r)
    assert len(groups) == 8
    for group in groups.values():
        assert [r["trace_rank"] for r in group] == list(range(len(group))) == list(range(group[0]["trace_rows"]))
        traces = [r["trace"] for r in group]
        assert len(set(traces)) == len(traces) and len(traces) <= max(1, group[0]["accepted"])


def test_kill_and_resume_gives_the_uninterrupted_rows(tiny, tmp_path):
    n = 40
    write_questions(tmp_path / "q.jsonl", n, hide_every=3)
    args = ["label", "--model", tiny, "--questions", tmp_path / "q.jsonl", "-k", 4, "--max-new-tokens", 24,
            "--batch-questions", 2, "--device", "cpu"]
    label_file(tiny, tmp_path / "q.jsonl", tmp_path / "clean.jsonl", dataclasses.replace(CFG, batch_questions=2))

    out = tmp_path / "labels.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "keel", *map(str, args), "--out", out], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    partial = len(read_rows(out)) + len(read_rows(LabelFiles.at(out).unlabelled))
    assert 5 <= partial < n

    r = keel(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["questions"] == n

    def strip(rows):
        return [{k: v for k, v in row.items() if k != "created"} for row in rows]

    resumed, resumed_u = all_rows(out)
    clean, clean_u = all_rows(tmp_path / "clean.jsonl")
    ids = [row["id"] for row in resumed + resumed_u]
    assert sorted(ids) == list(range(n))  # no duplicates, nothing lost
    assert strip(resumed) == strip(clean) and strip(resumed_u) == strip(clean_u)


def test_review_round_trip_on_the_command_line(tmp_path):
    out = tmp_path / "labels.jsonl"
    base = {"answer": "5", "trace": "<think></think><answer>5</answer>", "method": "majority", "accepted": 2,
            "samples": 4, "confidence": 0.5}
    write_rows(out, [{**base, "question": "2+3", "flagged": False, "input_sha256": "a"},
                     {**base, "question": "9+9", "flagged": True, "flag_reason": "tie", "input_sha256": "b"}])
    review = tmp_path / "review.csv"
    r = keel("label", "review", "--in", out, "--export", review)
    assert r.returncode == 0 and "wrote 1 question" in r.stdout, r.stderr
    text = review.read_text()
    assert "9+9" in text and "2+3" not in text
    review.write_text(text.replace("\r\n", "\n").rstrip("\n") + "18\n")  # human_answer is the last column
    r = keel("label", "review", "--in", out, "--import", review)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"imported": 1, "still_flagged": 0}
    rows = read_rows(out)
    assert [(x["method"], x["answer"], x["trace"]) for x in rows] == [("majority", "5", base["trace"]), ("human", "18", None)]


@pytest.mark.parametrize("text, needle", [
    ('{"question": "1+1"}\n{"question": "2+2"\n', "line 2 is not valid JSON"),
    ('{"problem": "1+1"}\n', "no column 'question'"),
    ('{"question": ""}\n', "line 1 has no question"),
])
def test_malformed_question_files_get_one_line_and_write_nothing(tmp_path, text, needle):
    (tmp_path / "q.jsonl").write_text(text)
    r = keel("label", "--model", tmp_path / "no-model", "--questions", tmp_path / "q.jsonl", "--out", tmp_path / "l.jsonl")
    assert_one_line_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


def test_other_bad_input_gets_one_line(tiny, tmp_path):
    write_questions(tmp_path / "q.jsonl", 4)
    assert_one_line_error(keel("label", "--questions", tmp_path / "q.jsonl"), "needs --model")
    r = keel("label", "--model", tiny, "--questions", tmp_path / "q.jsonl", "--out", tmp_path / "q.jsonl")
    assert_one_line_error(r, "not a keel label row")  # --out pointed at the questions
    assert_one_line_error(keel("label", "review", "--in", tmp_path / "q.jsonl"), "--export")
    with pytest.raises(KeelError, match="does not exist.*keel init-model"):
        label_file(tmp_path / "none", tmp_path / "q.jsonl", tmp_path / "l.jsonl", CFG)
    label_file(tiny, tmp_path / "q.jsonl", tmp_path / "l.jsonl", CFG)
    with pytest.raises(KeelError, match="other settings"):  # a resume must use the same arguments
        label_file(tiny, tmp_path / "q.jsonl", tmp_path / "l.jsonl", dataclasses.replace(CFG, seed=1))


def test_expert_iteration_runs_and_reports(tiny, tmp_path):
    from keel.expert import expert_iteration

    cfg = ExpertIterationConfig(task_options={"digits": 1}, questions=12, label=LabelConfig(k=4, max_new_tokens=24),
                                sft=SFTConfig(steps=3, batch_tokens=512), eval=EvalConfig(n=5, k=2, max_new_tokens=24))
    report = expert_iteration(cfg, tiny, tmp_path / "ei", device="cpu")
    assert report["gain_pass@1"] == report["after"]["pass@1"] - report["before"]["pass@1"]
    assert 0 <= report["trace_precision"] <= 1 and 1 <= report["train_traces"] <= 12
    train = (tmp_path / "ei" / "train.jsonl").read_text().splitlines()
    assert len(train) == report["train_traces"]
    assert "answer" not in json.loads((tmp_path / "ei" / "questions.jsonl").read_text().splitlines()[0])
    assert (tmp_path / "ei" / "model" / "config.json").is_file() and (tmp_path / "ei" / "report.md").is_file()
    assert json.loads((tmp_path / "ei" / "report.json").read_text())["labels"]["questions"] == 12
