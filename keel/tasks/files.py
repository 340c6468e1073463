"""A task read from a local JSONL or Parquet file of question/answer rows (e.g. GSM8K).

The file is read and checked once, in the constructor, so a bad dataset fails before training
starts. Rows are split into train/test by the same stable question hash as the built-in tasks.
GSM8K-style answers ("...reasoning... #### 72") keep only the part after the last "####".
Repeated questions keep their first row. The reward is the shared numeric one.
"""

from __future__ import annotations

import json
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_write
from keel.tasks.base import Example, check_n, check_split, is_test, numeric_reward, split_rng


def read_dataset_rows(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(where, row)], column names) from a .jsonl or .parquet file, `where` being "line 3" or
    "row 3" for error messages; KeelError naming the file otherwise."""
    if not path.is_file():
        raise KeelError(f"dataset file {path} does not exist; check the path")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as e:
            raise KeelError(f"cannot read {path} as Parquet ({type(e).__name__}: {e}); check the file") from None
        rows = [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
        return rows, list(table.column_names)
    rows, columns = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise KeelError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
                if not isinstance(row, dict):
                    raise KeelError(f"{path} line {lineno} is not a JSON object; each line must be {{\"question\": ..., \"answer\": ...}}")
                rows.append((f"line {lineno}", row))
                columns.update(dict.fromkeys(row))
    except (OSError, UnicodeDecodeError) as e:
        raise KeelError(f"cannot read {path} ({type(e).__name__}: {e}); check the file is UTF-8 JSONL") from None
    return rows, list(columns)


def write_dataset(examples, path: str | Path) -> Path:
    """Write examples as JSONL rows (question, answer, trace and task fields) that FileTask reads."""
    return atomic_write(path, "".join(json.dumps(ex.to_row()) + "\n" for ex in examples))


def gsm8k_final_answer(text: str) -> str:
    """The part of a GSM8K-style answer after its last "####" (all of it when there is none)."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


class FileTask:
    """Local JSONL/Parquet dataset. `question_key`/`answer_key`/`trace_key` name the columns; the trace
    column is optional (used for SFT when present). `test_fraction` of questions go to "test"."""

    def __init__(
        self,
        path: str,
        question_key: str = "question",
        answer_key: str = "answer",
        trace_key: str = "trace",
        test_fraction: float = 0.1,
    ):
        self.path = Path(path)
        self.name = str(path)
        if isinstance(test_fraction, str):
            try:
                test_fraction = float(test_fraction)
            except ValueError:
                pass
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
            raise KeelError(f"test_fraction={test_fraction!r} must be a number in [0, 1), e.g. 0.1")
        self.test_fraction = float(test_fraction)

        rows, columns = read_dataset_rows(self.path)
        if not rows:
            raise KeelError(f"dataset file {self.path} has no rows; point the task at a non-empty file")
        for key, option in ((question_key, "question_key"), (answer_key, "answer_key")):
            if key not in columns:
                raise KeelError(
                    f"{self.path} has no column {key!r} (columns: {', '.join(map(str, columns))}); "
                    f"name the column with the task option {option}", field=f"task_options.{option}")

        self._splits: dict[str, list[Example]] = {"train": [], "test": []}
        seen: set[str] = set()
        for where, row in rows:
            q, a = row.get(question_key), row.get(answer_key)
            if q is None or a is None or str(q).strip() == "" or str(a).strip() == "":
                missing = question_key if q is None or str(q).strip() == "" else answer_key
                raise KeelError(f"{self.path} {where} has no value for {missing!r}; fill it in or drop the row")
            q, a = str(q), gsm8k_final_answer(str(a))
            if q in seen:
                continue
            seen.add(q)
            trace = row.get(trace_key)
            trace = str(trace) if trace is not None and str(trace).strip() else None
            split = "test" if is_test(q, self.test_fraction) else "train"
            self._splits[split].append(Example(question=q, answer=a, trace=trace))

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """n examples of `split` in a seeded shuffled order."""
        check_split(split)
        check_n(n)
        pool = self._splits[split]
        if n > len(pool):
            raise KeelError(
                f"asked for {n} {split} examples but {self.path} has {len(pool)} in that split; "
                f"ask for at most {len(pool)} or change test_fraction"
            )
        order = list(range(len(pool)))
        split_rng(self.path.name, split, seed).shuffle(order)
        return [pool[i] for i in order[:n]]

    def reward(self, completion: str, example: Example) -> dict[str, float]:
        return numeric_reward(completion, example)
