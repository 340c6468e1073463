"""keel.label without a model: votes, selection, provenance, question files, journals, review."""

import csv
import json

import pytest

from keel.config import LabelConfig
from keel.errors import KeelError
from keel.label import (
    Label,
    LabelFiles,
    Question,
    apply_human,
    chunk_seed,
    decide,
    export_review,
    flag_reason,
    import_review,
    input_hash,
    job_spec,
    majority_vote,
    make_rows,
    make_verifier,
    model_fingerprint,
    rank_traces,
    read_questions,
    read_rows,
    recover,
    summarize,
    vote_key,
    write_rows,
)


def trace(answer, think="w"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------- votes


def test_vote_key_canonicalises_numbers_and_text():
    assert vote_key("1,000") == vote_key("1000") == vote_key("1000.0") == vote_key("$1000.") == "1000"
    assert vote_key("0.5") == vote_key("1/2") == "1/2"
    assert vote_key("-3") == "-3"
    assert vote_key(" X + 1 ") == vote_key("x+1") == "x+1"
    assert vote_key(None) is None and vote_key("  ") is None


def test_majority_vote_counts_over_all_k_samples():
    vote = majority_vote(["3", "3", "5", None])
    assert (vote.answer, vote.votes, vote.samples, vote.members, vote.tie) == ("3", 2, 4, (0, 1), False)
    assert vote.confidence == 0.5


def test_thousands_separators_vote_together():
    vote = majority_vote(["1,000", "7", "1000", "7.5"])
    assert vote.answer == "1000" and vote.votes == 2 and vote.members == (0, 2)


def test_tie_goes_to_the_earliest_first_vote_and_is_flagged():
    vote = majority_vote(["5", "3", "3", "5", None, "2"])
    assert vote.answer == "5" and vote.tie and vote.votes == 2 and vote.members == (0, 3)
    assert flag_reason(vote, threshold=0.0) == "tie"
    assert majority_vote(["9", "1"]).answer == "9"  # all different: the first sample's answer


def test_no_answers_and_low_agreement_are_flagged():
    none = majority_vote([None, "", None])
    assert (none.answer, none.votes, none.confidence) == (None, 0, 0.0)
    assert flag_reason(none, 0.5) == "no answer"
    low = majority_vote(["4", "4", "1", "2", "3"])  # 2/5 = 0.4
    assert flag_reason(low, 0.5) == "low agreement" and flag_reason(low, 0.4) is None


def test_rank_traces_prefers_format_then_confidence_then_order():
    texts = ["42", trace(42), trace(42), trace(42)]
    logps = [-0.01, -0.5, -0.2, -0.2]
    assert rank_traces([0, 1, 2, 3], texts, logps) == [2, 3, 1, 0]


# ----------------------------------------------------------------------------- decide


def test_verified_keeps_correct_traces_and_labels_with_the_reference():
    q = Question("2+2", "4")
    texts = [trace(5), trace(4, "a"), trace(4, "b"), trace(4, "a")]
    label = decide(q, texts, [-1.0, -0.3, -0.1, -0.3], make_verifier(), threshold=0.5)
    assert (label.method, label.answer, label.accepted, label.confidence, label.flag) == ("verified", "4", 3, 0.75, None)
    assert label.traces == [trace(4, "b"), trace(4, "a")]  # best first, duplicates dropped


def test_a_reference_no_sample_reached_is_unverified_and_flagged():
    # issue 18: such rows were written as "verified" with accepted 0, trace null and no flag
    label = decide(Question("2+2", "4"), [trace(5), trace(3)], [0.0, 0.0], make_verifier(), 0.5)
    assert (label.method, label.answer, label.traces, label.confidence) == ("unverified", "4", [], 0.0)
    assert label.flag == "no sample verified"
    row = make_rows(Question("2+2", "4"), label, "h", {}, all_traces=False, created="t")[0]
    assert (row["method"], row["flagged"], row["accepted"], row["trace"]) == ("unverified", True, 0, None)


def test_majority_label_is_spelled_as_its_best_trace():
    texts = [trace("1000"), trace("7"), trace("1,000"), trace("7")]
    label = decide(Question("x", None), texts, [-0.5, -0.1, -0.2, -0.1], make_verifier(), threshold=0.5)
    # 1000 and 7 tie 2-2: 1000 voted first, so it wins, flagged; its surer trace spells "1,000"
    assert (label.method, label.answer, label.accepted, label.confidence, label.flag) == ("majority", "1,000", 2, 0.5, "tie")
    assert label.traces == [trace("1,000"), trace("1000")]


def test_task_verifier_checks_countdown_expressions_with_the_row_fields():
    verify = make_verifier("countdown")
    q = Question("3 7 9 -> 6", "(9-7)*3", {"numbers": [3, 7, 9], "target": 6})
    assert verify(trace("3*(9-7)"), q) and not verify(trace("9-3"), q) and not verify("garbage", q)


# ----------------------------------------------------------------------------- provenance


def test_input_hash_changes_with_every_input_that_decides_a_row(tmp_path):
    q = Question("2+2", "4")
    base = job_spec(LabelConfig(), "m1")
    h = input_hash(q, base)
    assert h == input_hash(Question("2+2", "4", {"id": 7}), base)  # extra fields do not decide the label
    assert len({h, input_hash(Question("2+3", "4"), base), input_hash(Question("2+2", None), base),
                input_hash(q, job_spec(LabelConfig(), "m2")), input_hash(q, job_spec(LabelConfig(seed=1), "m1")),
                input_hash(q, job_spec(LabelConfig(k=4), "m1")),
                input_hash(q, job_spec(LabelConfig(temperature=0.7), "m1"))}) == 7
    assert input_hash(q, job_spec(LabelConfig(batch_questions=2, device="cpu"), "m1")) == h
    assert chunk_seed(["a", "b"]) == chunk_seed(["a", "b"]) != chunk_seed(["b", "a"])


def test_model_fingerprint_covers_every_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    a = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 9 + b"\x01")
    assert model_fingerprint(tmp_path) != a


def test_rows_carry_provenance_and_keep_the_files_fields():
    q = Question("2+2", "4", {"id": 3, "trace": "old", "source": "x"})
    label = Label("verified", "4", [trace(4, "a"), trace(4, "b")], 0.5, 2, None)
    prov = {"samples": 4, "model": "m", "sampling": {"k": 4}}
    (row,) = make_rows(q, label, "h", prov, all_traces=False, created="t")
    assert row["trace"] == trace(4, "a") and row["id"] == 3 and row["source"] == "x"
    assert (row["method"], row["confidence"], row["input_sha256"], row["model"]) == ("verified", 0.5, "h", "m")
    rows = make_rows(q, label, "h", prov, all_traces=True, created="t")
    assert [(r["trace"], r["trace_rank"], r["trace_rows"]) for r in rows] == [(trace(4, "a"), 0, 2), (trace(4, "b"), 1, 2)]


# ----------------------------------------------------------------------------- question files


def write(path, text):
    path.write_text(text)
    return path


def test_read_questions_keeps_fields_and_makes_answers_optional(tmp_path):
    f = write(tmp_path / "q.jsonl", '{"question": "1+1", "answer": "2", "id": 1}\n\n'
                                    '{"question": "2+2", "id": 2}\n{"question": "3+3", "answer": "x #### 6"}\n'
                                    '{"question": "1+1", "answer": "3"}\n')
    qs = read_questions(f)
    assert [(q.question, q.reference, q.extra) for q in qs] == [("1+1", "2", {"id": 1}), ("2+2", None, {"id": 2}),
                                                                 ("3+3", "6", {})]


def test_read_questions_takes_the_reference_from_a_math_solution(tmp_path):
    # A MATH-style solution column: the reference is its last box, nested braces whole (the whole
    # solution, compared with the model's answer, would never match).
    row = {"problem": "Half of one?", "solution": "One split in two is $\\boxed{\\frac{1}{2}}$."}
    f = write(tmp_path / "q.jsonl", json.dumps(row) + "\n")
    (q,) = read_questions(f, question_key="problem", answer_key="solution")
    assert q.reference == "\\frac{1}{2}"


def test_read_questions_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "1+1", "answer": None, "level": 2}]), tmp_path / "q.parquet")
    (q,) = read_questions(tmp_path / "q.parquet", question_key="problem")
    assert (q.question, q.reference, q.extra) == ("1+1", None, {"level": 2})


@pytest.mark.parametrize("name, text, needle", [
    ("q.jsonl", '{"question": "1+1"}\n{"question": "2+2",\n', "line 2 is not valid JSON"),
    ("q.jsonl", '["1+1"]\n', "line 1 is not a JSON object"),
    ("q.jsonl", '{"problem": "1+1"}\n', "no column 'question'"),
    ("q.jsonl", '{"question": "1+1"}\n{"question": "  "}\n', "line 2 has no question"),
    ("q.jsonl", "", "has no rows"),
    ("q.csv", "question\n1+1\n", "must be .jsonl or .parquet"),
    ("q.parquet", "not parquet", "cannot read"),
])
def test_malformed_question_files_get_one_line_errors(tmp_path, name, text, needle):
    with pytest.raises(KeelError, match=needle) as e:
        read_questions(write(tmp_path / name, text))
    assert "\n" not in str(e.value)
    with pytest.raises(KeelError, match="does not exist"):
        read_questions(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- journals


def row(h, **kw):
    return {"question": h, "answer": "1", "trace": trace(1), "method": "majority", "flagged": False,
            "accepted": 1, "samples": 2, "confidence": 0.5, "input_sha256": h, **kw}


def test_recover_cuts_a_torn_last_line(tmp_path):
    f = tmp_path / "l.jsonl"
    good = json.dumps(row("a")) + "\n" + json.dumps(row("b")) + "\n"
    f.write_text(good + '{"question": "c", "ans')
    rows, keep = recover(f)
    assert [r["input_sha256"] for r in rows] == ["a", "b"] and keep == len(good.encode())
    f.write_text(good + json.dumps(row("c")))  # complete JSON but no newline: the write was cut short
    assert [r["input_sha256"] for r in recover(f)[0]] == ["a", "b"]


def test_recover_drops_a_question_whose_traces_were_not_all_written(tmp_path):
    f = tmp_path / "l.jsonl"
    a = json.dumps(row("a", trace_rank=0, trace_rows=1)) + "\n"
    b0 = json.dumps(row("b", trace_rank=0, trace_rows=3)) + "\n"
    b1 = json.dumps(row("b", trace_rank=1, trace_rows=3)) + "\n"
    f.write_text(a + b0 + b1)
    rows, keep = recover(f, all_traces=True)
    assert [r["input_sha256"] for r in rows] == ["a"] and keep == len(a.encode())


def test_recover_refuses_damage_that_is_not_a_torn_tail(tmp_path):
    f = tmp_path / "l.jsonl"
    f.write_text(json.dumps(row("a")) + "\nnot json\n" + json.dumps(row("b")) + "\n")
    with pytest.raises(KeelError, match="line 2 is not a keel label row"):
        recover(f)
    f.write_text('{"question": "1+1", "answer": "2"}\n')  # a questions file given as --out
    with pytest.raises(KeelError, match="pass a new out"):
        recover(f)


def test_label_files_follow_the_format():
    files = LabelFiles.at("d/labels.parquet")
    assert files.parquet and files.journal.name == "labels.parquet.partial.jsonl"
    assert files.unlabelled.name == "labels.unlabelled.jsonl" and files.plot.name == "labels.agreement.png"
    assert LabelFiles.at("labels.jsonl").journal.name == "labels.jsonl"
    with pytest.raises(KeelError, match=r"name it \*.parquet"):
        LabelFiles.at("labels.jsonl", "parquet")


def test_summarize_counts_questions_not_rows():
    rows = [row("a", method="verified", accepted=2), row("b", flagged=True, accepted=1),
            row("b", flagged=True, accepted=1), row("c", method="human", trace=None)]
    s = summarize(rows, [row("d", answer=None, trace=None, flagged=True, accepted=0)])
    assert (s["questions"], s["rows"], s["verified"], s["majority"], s["human"]) == (4, 4, 1, 1, 1)
    assert (s["with_trace"], s["flagged"], s["unlabelled"]) == (2, 2, 1)
    assert s["accept_rate"] == (2 + 1 + 0) / (2 + 2 + 2)


# ----------------------------------------------------------------------------- review


def test_human_answer_keeps_traces_only_when_it_agrees():
    rows = [row("a", answer="1,000", trace_rank=0, trace_rows=2), row("a", answer="1,000", trace_rank=1, trace_rows=2)]
    agree = apply_human(rows, "1000", "t")
    assert len(agree) == 2 and all(r["method"] == "human" and r["answer"] == "1000" and r["trace"] for r in agree)
    assert agree[0]["model_answer"] == "1,000" and not agree[0]["flagged"] and agree[0]["confidence"] == 1.0
    (disagree,) = apply_human(rows, "7", "t")
    assert (disagree["answer"], disagree["trace"], disagree["trace_rows"], disagree["model_answer"]) == ("7", None, 1, "1,000")
    assert apply_human([disagree], "8", "t")[0]["model_answer"] == "1,000"  # a second review keeps the model's answer


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_review_round_trip_through_a_spreadsheet(tmp_path, suffix):
    out = tmp_path / f"labels.{suffix}"
    write_rows(out, [row("a"), row("b", flagged=True, flag_reason="tie"), row("c", flagged=True, flag_reason="tie")])
    write_rows(LabelFiles.at(out).unlabelled, [row("d", answer=None, trace=None, flagged=True, flag_reason="no answer")])
    review = tmp_path / "review.csv"
    assert export_review(out, review) == 3
    with open(review, newline="") as f:
        items = list(csv.DictReader(f))
    assert [r["input_sha256"] for r in items] == ["b", "c", "d"] and items[2]["flag_reason"] == "no answer"
    items[0]["human_answer"], items[2]["human_answer"] = "1", "42"  # c is left for later
    with open(review, "w", newline="", encoding="utf-8-sig") as f:  # as a spreadsheet saves it
        w = csv.DictWriter(f, list(items[0]))
        w.writeheader()
        w.writerows(items)
    assert import_review(out, review) == {"imported": 2, "still_flagged": 1}
    rows = {r["input_sha256"]: r for r in read_rows(out)}
    assert list(rows) == ["a", "b", "c", "d"]
    assert (rows["b"]["method"], rows["b"]["answer"], rows["b"]["trace"]) == ("human", "1", trace(1))
    assert (rows["d"]["method"], rows["d"]["answer"], rows["d"]["trace"]) == ("human", "42", None)
    assert rows["a"]["method"] == "majority" and rows["c"]["flagged"]
    assert not LabelFiles.at(out).unlabelled.exists()
    assert export_review(out, review) == 1  # only c is left


def test_review_import_errors(tmp_path):
    out = tmp_path / "labels.jsonl"
    write_rows(out, [row("a", flagged=True)])
    bad = write(tmp_path / "r.csv", "question,answer\nq,1\n")
    with pytest.raises(KeelError, match="no column"):
        import_review(out, bad)
    stranger = write(tmp_path / "s.csv", "input_sha256,human_answer\nzzz,1\n")
    with pytest.raises(KeelError, match="not in"):
        import_review(out, stranger)
    with pytest.raises(KeelError, match="does not exist"):
        export_review(tmp_path / "nope.jsonl", tmp_path / "r2.csv")


def test_parquet_keeps_fields_that_only_later_rows_have(tmp_path):
    out = tmp_path / "labels.parquet"
    write_rows(out, [row("a"), row("b", method="human", model_answer="7")])
    rows = read_rows(out)
    assert rows[1]["model_answer"] == "7" and rows[0]["model_answer"] is None
