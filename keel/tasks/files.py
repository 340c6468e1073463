"""Tasks read from datasets as users hold them: a JSONL or Parquet file, a folder of Parquet/JSONL
shards, or a folder written by Hugging Face `datasets`' `save_to_disk` (a Dataset or a DatasetDict).

The data is read and checked once, in the constructor, so a bad dataset fails before training
starts. A dataset with one table is split into train/test by the same stable question hash as the
built-in tasks; a dataset that brings its own splits (a DatasetDict, shards named train-*/test-*
as on the Hub) keeps them: keel's train split is its `train`, keel's test split its `test` (else
`validation`), and a train question that is also a test question is dropped from train.

Answers are read as the common datasets write them: GSM8K's "working ... #### 72" gives the
reference "72" and the working as the SFT trace; a MATH solution gives the content of its last
`\\boxed{}` as the reference and the solution as the trace. Repeated questions keep their first row.
The reward is the shared one (keel's verifier, math-verify for LaTeX).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_write
from keel.tasks.verify import last_boxed
from keel.tasks.base import (TEST_FRACTION, Example, check_n, check_split, is_test, numeric_reward,
                             split_rng)

DATA_SUFFIXES = (".jsonl", ".parquet")
TEST_SPLITS = ("test", "validation")  # a dataset's own split that keel's "test" reads, first found
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"

Rows = list[tuple[str, dict]]  # (where, row), `where` being "line 3" or "train row 3" for messages


def read_dataset_rows(path: Path) -> tuple[Rows, list[str]]:
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


def read_splits(path: Path) -> dict[str, tuple[Rows, list[str]]]:
    """{split: (rows, column names)} of a dataset file or folder. A file, a saved Dataset or a folder
    of shards whose names say no split is one split; a saved DatasetDict has its own; shards are
    assigned to splits by their file names, as `datasets.load_dataset` does (train-00000-of-00002.parquet,
    test.jsonl, ...)."""
    if path.is_file():
        return {"": read_dataset_rows(path)}
    if not path.is_dir():
        raise KeelError(f"dataset {path} does not exist; check the path")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path)
    return _read_shards(path)


def _read_saved(path: Path) -> dict[str, tuple[Rows, list[str]]]:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (memory-mapped Arrow)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:
        raise KeelError(f"cannot read {path} as a `datasets` folder ({type(e).__name__}: {e}); "
                        "write it with Dataset.save_to_disk") from None
    tables = saved.items() if isinstance(saved, datasets.DatasetDict) else [("", saved)]
    return {name: ([(f"{name + ' ' if name else ''}row {i}", row) for i, row in enumerate(table.to_list(), start=1)],
                   list(table.column_names)) for name, table in tables}


def _read_shards(path: Path) -> dict[str, tuple[Rows, list[str]]]:
    """A folder of .parquet/.jsonl shards (other files ignored), grouped into splits by `datasets`'
    own file-name conventions; shards without a split in their names are all "train"."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    base = str(path.resolve())
    try:
        patterns = get_data_patterns(base)
    except EmptyDatasetError:
        patterns = {}
    files = DataFilesDict.from_patterns(patterns, base_path=base) if patterns else {}
    splits = {}
    for split, names in files.items():
        shards = [Path(name) for name in names if Path(name).suffix.lower() in DATA_SUFFIXES]
        if not shards:
            continue
        rows, columns = [], {}
        for shard in sorted(shards):
            shard_rows, shard_columns = read_dataset_rows(shard)
            rows += [(f"{shard.relative_to(base)} {where}", row) for where, row in shard_rows]
            columns.update(dict.fromkeys(shard_columns))
        splits[str(split)] = (rows, list(columns))
    if not splits:
        raise KeelError(f"folder {path} holds no dataset: point the task at a folder written by "
                        "Dataset.save_to_disk, or one of .parquet/.jsonl files (shards), or at one such file")
    return splits


def write_dataset(examples, path: str | Path) -> Path:
    """Write examples as JSONL rows (question, answer, trace and task fields) that FileTask reads."""
    return atomic_write(path, "".join(json.dumps(ex.to_row()) + "\n" for ex in examples))


def worked_answer(text: str) -> tuple[str, str | None]:
    """(reference answer, working) of an answer column's value: GSM8K's "working #### 72" gives
    ("72", the working without its <<calculator>> annotations); a solution with a `\\boxed{}` gives
    (the last box's content, the solution); anything else is the answer itself, with no working."""
    if "####" in text:
        working, final = text.rsplit("####", 1)
        return final.strip(), _CALCULATOR.sub("", working).strip() or None
    boxed = last_boxed(text)
    if boxed:
        working = text.strip()
        return boxed, None if working in (boxed, f"\\boxed{{{boxed}}}") else working
    return text.strip(), None


class FileTask:
    """A dataset file or folder (see the module docstring). `question_key`/`answer_key`/`trace_key`
    name the columns; the trace column is optional (SFT uses it where present, else the working of a
    GSM8K/MATH answer). A dataset of one table is split by question hash, `test_fraction` (default
    0.1) to "test"; one with its own train and test splits keeps them, unless `split` picks one of
    them to divide by hash instead."""

    answer_needs_box = False  # MathTask: every reference must come from a \boxed{}

    def __init__(
        self,
        path: str,
        question_key: str = "question",
        answer_key: str = "answer",
        trace_key: str = "trace",
        test_fraction: float | None = None,
        split: str | None = None,
    ):
        self.path = Path(path)
        self.name = str(path)
        if isinstance(test_fraction, str):
            try:
                test_fraction = float(test_fraction)
            except ValueError:
                pass
        if test_fraction is not None and (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
                                          or not 0 <= test_fraction < 1):
            raise KeelError(f"test_fraction={test_fraction!r} must be a number in [0, 1), e.g. 0.1",
                            field="task_options.test_fraction")
        self.question_key, self.answer_key, self.trace_key = question_key, answer_key, trace_key

        splits = read_splits(self.path)
        if split is not None:
            if split not in splits or not split:
                raise KeelError(f"{self.path} has no split {split!r} (splits: {', '.join(s for s in splits if s) or 'none'})",
                                field="task_options.split")
            splits = {split: splits[split]}
        self.splits_from = "hash"
        if len(splits) == 1:
            rows, columns = next(iter(splits.values()))
            self._check_columns(columns, rows)
            self.test_fraction = TEST_FRACTION if test_fraction is None else float(test_fraction)
            self._splits = {"train": [], "test": []}
            for ex in self._examples(rows):
                self._splits["test" if is_test(ex.question, self.test_fraction) else "train"].append(ex)
            return
        test_name = next((s for s in TEST_SPLITS if s in splits), None)
        if "train" not in splits or test_name is None or test_fraction is not None:
            why = (f"test_fraction divides one table, and {self.path} has splits" if test_fraction is not None
                   else f"{self.path} has splits")
            raise KeelError(f"{why} {', '.join(splits)}: name the one to divide into train and test with the "
                            f"task option split (e.g. split={next(iter(splits))})", field="task_options.split")
        self.splits_from, self.test_fraction = f"train/{test_name}", None
        for name in ("train", test_name):
            self._check_columns(splits[name][1], splits[name][0])
        test = self._examples(splits[test_name][0])
        in_test = {ex.question for ex in test}
        self._splits = {"train": [ex for ex in self._examples(splits["train"][0]) if ex.question not in in_test],
                        "test": test}

    def _check_columns(self, columns: list, rows: Rows) -> None:
        if not rows:
            raise KeelError(f"dataset {self.path} has no rows; point the task at a non-empty dataset")
        for key, option in ((self.question_key, "question_key"), (self.answer_key, "answer_key")):
            if key not in columns:
                raise KeelError(
                    f"{self.path} has no column {key!r} (columns: {', '.join(map(str, columns))}); "
                    f"name the column with the task option {option}", field=f"task_options.{option}")

    def _examples(self, rows: Rows) -> list[Example]:
        """One Example per distinct question, in row order."""
        out, seen = [], set()
        for where, row in rows:
            q, a = row.get(self.question_key), row.get(self.answer_key)
            if q is None or a is None or str(q).strip() == "" or str(a).strip() == "":
                missing = self.question_key if q is None or str(q).strip() == "" else self.answer_key
                raise KeelError(f"{self.path} {where} has no value for {missing!r}; fill it in or drop the row")
            q = str(q)
            if q in seen:
                continue
            seen.add(q)
            if self.answer_needs_box and last_boxed(str(a)) is None:
                raise KeelError(f"{self.path} {where}: no \\boxed{{}} answer in {self.answer_key!r}; the math task "
                                "reads each reference from its solution's last \\boxed{}: point answer_key at such a "
                                "column, or use the dataset itself as the task", field="task_options.answer_key")
            answer, working = worked_answer(str(a))
            trace = row.get(self.trace_key)
            if trace is not None and str(trace).strip():
                trace = str(trace)
            else:
                trace = f"<think>{working}</think><answer>{answer}</answer>" if working else None
            out.append(Example(question=q, answer=answer, trace=trace))
        return out

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """n examples of `split` in a seeded shuffled order."""
        check_split(split)
        check_n(n)
        pool = self._splits[split]
        if n > len(pool):
            fix = "change test_fraction" if self.splits_from == "hash" else "divide one split with the task option split"
            raise KeelError(
                f"asked for {n} {split} examples but {self.path} has {len(pool)} in that split; "
                f"ask for at most {len(pool)} or {fix}"
            )
        order = list(range(len(pool)))
        split_rng(self.path.name, split, seed).shuffle(order)
        return [pool[i] for i in order[:n]]

    def reward(self, completion: str, example: Example) -> dict[str, float]:
        return numeric_reward(completion, example)


class MathTask(FileTask):
    """`task: math`: a MATH-style dataset (problem/solution columns by default) given by the task
    option `path`; the reference is the last `\\boxed{}` of each solution, checked by keel's verifier
    (math-verify for LaTeX answers), and the solution is the SFT trace."""

    answer_needs_box = True

    def __init__(self, path: str | None = None, question_key: str = "problem", answer_key: str = "solution",
                 trace_key: str = "trace", test_fraction: float | None = None, split: str | None = None):
        if not path:
            raise KeelError("task math reads a MATH-style dataset: give its file or folder with the task "
                            "option path (e.g. path=data/math)", field="task_options.path")
        super().__init__(path, question_key, answer_key, trace_key, test_fraction, split)
