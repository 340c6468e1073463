"""The questions file: one question per JSONL line or Parquet row, an optional reference answer,
and any other fields, which ride along into the label rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keel.errors import KeelError
from keel.tasks.files import read_dataset_rows, worked_answer


@dataclass(frozen=True)
class Question:
    question: str
    reference: str | None               # the known answer, if any
    extra: dict = field(default_factory=dict)  # the row's other fields, kept in the output


def read_questions(path: str | Path, question_key: str = "question", answer_key: str = "answer") -> list[Question]:
    """Questions from a .jsonl or .parquet file; `answer_key` is optional per row. Repeated questions
    keep their first row. KeelError naming the file, line and fix for anything malformed."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise KeelError(f"questions file {path} must be .jsonl or .parquet (one question per line or row)",
                        field="questions_path")
    rows, columns = read_dataset_rows(path)
    if not rows:
        raise KeelError(f"questions file {path} has no rows; give it one {{\"question\": ...}} per line",
                        field="questions_path")
    if question_key not in columns:
        raise KeelError(f"{path} has no column {question_key!r} (columns: {', '.join(map(str, columns))}); "
                        "set question_key to the question column", field="question_key")
    out, seen = [], set()
    for where, row in rows:
        q = row.get(question_key)
        if q is None or isinstance(q, (dict, list)) or not str(q).strip():
            raise KeelError(f"{path} {where} has no question in {question_key!r}; fill it in or drop the row",
                            field="questions_path")
        q = str(q)
        if q in seen:
            continue
        seen.add(q)
        a = row.get(answer_key)
        reference = worked_answer(str(a))[0] if a is not None and str(a).strip() else None  # GSM8K "####", MATH \boxed{}
        extra = {k: v for k, v in row.items() if k not in (question_key, answer_key)}
        out.append(Question(q, reference, extra))
    return out
