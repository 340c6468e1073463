"""People review what the model could not label well: flagged and unlabelled questions go out to
a CSV, a person fills in `human_answer`, and the answers come back as `human` rows."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_path
from keel.label.journal import LabelFiles, read_rows, write_rows
from keel.label.provenance import utc_now
from keel.label.run import per_question, summarize
from keel.label.votes import vote_key

REVIEW_COLUMNS = ["input_sha256", "question", "model_answer", "confidence", "flag_reason", "trace", "human_answer"]
# A cell a spreadsheet would run as a formula starts with one of these (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def spreadsheet_safe(value):
    """`value` as a CSV cell no spreadsheet evaluates: text starting like a formula gets a leading
    single quote (OWASP's advice), so model output such as `=HYPERLINK(...)` or `-2+3` stays text.
    Plain numbers ("-3") and non-text values are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def _review_files(labels: str | Path) -> LabelFiles:
    files = LabelFiles.at(labels)
    if not files.out.exists():
        raise KeelError(f"label file {files.out} does not exist; pass the out of a label run", field="labels")
    if files.parquet and files.journal.exists():
        raise KeelError(f"{files.journal} exists: finish the labelling run (run it again) before reviewing",
                        field="labels")
    return files


def export_review(labels: str | Path, csv_path: str | Path) -> int:
    """Write the flagged questions of a label file, and its unlabelled ones, to a CSV for people:
    fill in `human_answer`, leave it blank to skip. Cells are made safe for spreadsheets
    (`spreadsheet_safe`). Returns how many questions were written."""
    files = _review_files(labels)
    items = [r for r in per_question(read_rows(files.out)) if r.get("flagged") and r.get("method") != "human"]
    items += per_question(read_rows(files.unlabelled))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, REVIEW_COLUMNS)
        w.writeheader()
        for r in items:
            row = {"input_sha256": r["input_sha256"], "question": r["question"], "model_answer": r.get("answer"),
                   "confidence": r.get("confidence"), "flag_reason": r.get("flag_reason"),
                   "trace": r.get("trace"), "human_answer": ""}
            w.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
    return len(items)


def read_review(csv_path: str | Path) -> dict[str, str]:
    """{input_sha256: human answer} from a review CSV; blank answers are skipped."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise KeelError(f"review file {csv_path} does not exist; write one with export_review first", field="csv_path")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets add a BOM
            reader = csv.DictReader(f)
            missing = {"input_sha256", "human_answer"} - set(reader.fieldnames or [])
            if missing:
                raise KeelError(f"{csv_path} has no column(s) {', '.join(sorted(missing))}; "
                                "keep the header that export_review wrote", field="csv_path")
            answers = {}
            for r in reader:
                h, a = (r.get("input_sha256") or "").strip(), (r.get("human_answer") or "").strip()
                if a:
                    if not h:
                        raise KeelError(f"{csv_path} line {reader.line_num} has no input_sha256; "
                                        "keep that column as exported", field="csv_path")
                    answers[h] = a
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise KeelError(f"cannot read {csv_path} as CSV ({type(e).__name__}: {e}); save it as UTF-8 CSV",
                        field="csv_path") from None
    return answers


def apply_human(rows: list[dict], answer: str, reviewed: str) -> list[dict]:
    """A question's rows relabelled by a person. The model's traces stay when the person agrees
    with the model's answer; otherwise one row without a trace (nothing sampled reached it)."""
    first = rows[0]
    human = {"answer": answer, "method": "human", "confidence": 1.0, "flagged": False, "flag_reason": None,
             "model_answer": first.get("model_answer", first.get("answer")) if first.get("method") == "human"
             else first.get("answer"), "reviewed": reviewed}
    if first.get("trace") is not None and vote_key(answer) == vote_key(first.get("answer")):
        return [{**r, **human} for r in rows]
    row = {**first, **human, "trace": None}
    if "trace_rows" in row:
        row.update(trace_rank=0, trace_rows=1)
    return [row]


def import_review(labels: str | Path, csv_path: str | Path) -> dict:
    """Merge human answers from a review CSV into a label file: those questions become `human`
    rows (and leave the unlabelled file). Returns {"imported", "still_flagged"}."""
    files = _review_files(labels)
    answers = read_review(csv_path)
    rows, unlabelled = read_rows(files.out), read_rows(files.unlabelled)
    known = {r["input_sha256"] for r in rows + unlabelled}
    unknown = [h for h in answers if h not in known]
    if unknown:
        raise KeelError(f"{csv_path} has {len(unknown)} row(s) whose input_sha256 is not in {files.out} "
                        f"(first: {unknown[0][:12]}...); export the review from this label file", field="csv_path")
    reviewed, groups = utc_now(), {}
    for r in rows + [r for r in unlabelled if r["input_sha256"] in answers]:
        groups.setdefault(r["input_sha256"], []).append(r)
    merged = []
    for h, group in groups.items():  # dicts keep first-seen order: OUT's order, then moved questions
        merged += apply_human(group, answers[h], reviewed) if h in answers else group
    write_rows(files.out, merged)
    rest = [r for r in unlabelled if r["input_sha256"] not in answers]
    if rest:
        write_rows(files.unlabelled, rest)
    else:
        files.unlabelled.unlink(missing_ok=True)
    return {"imported": len(answers), "still_flagged": summarize(merged, rest)["flagged"]}
