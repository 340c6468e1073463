"""The files of one labelling job, and reading and writing their rows.

OUT holds one row per labelled question (or per accepted trace), every row with an answer, so
`keel sft` and `keel rl` read it as a dataset; questions that no sample answered go to the sibling
`<stem>.unlabelled.jsonl`. Rows are appended and fsynced as they are made, to OUT itself or, for
Parquet output, to `<name>.partial.jsonl`, converted at the end. A killed run leaves at most a torn
last line, which `recover` cuts off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError
from keel.io import append_durably, atomic_path, atomic_write


@dataclass(frozen=True)
class LabelFiles:
    """Where one labelling job writes. `journal` is the JSONL that rows are appended to: OUT itself,
    or for Parquet output a sibling converted at the end."""
    out: Path
    parquet: bool

    @classmethod
    def at(cls, out: str | Path, fmt: str | None = None) -> "LabelFiles":
        out = Path(out)
        is_parquet = out.suffix.lower() == ".parquet"
        fmt = fmt or ("parquet" if is_parquet else "jsonl")
        if fmt not in ("jsonl", "parquet"):
            raise KeelError(f"format must be jsonl or parquet, not {fmt!r}", field="format")
        if (fmt == "parquet") != is_parquet or out.suffix.lower() not in (".jsonl", ".parquet"):
            raise KeelError(f"out {out} does not fit format {fmt}: name it *.{fmt}", field="out")
        return cls(out, fmt == "parquet")

    @property
    def journal(self) -> Path:
        return self.out.with_name(self.out.name + ".partial.jsonl") if self.parquet else self.out

    @property
    def unlabelled(self) -> Path:
        return self.out.with_name(self.out.stem + ".unlabelled.jsonl")

    @property
    def plot(self) -> Path:
        return self.out.with_name(self.out.stem + ".agreement.png")


def recover(path: Path, all_traces: bool = False) -> tuple[list[dict], int]:
    """(rows, bytes to keep) of a JSONL journal a killed run may have left. A torn last line is
    dropped, and so are the rows of a last question whose rows were not all written. Anything else
    malformed is a KeelError: that is damage, not an interruption."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    rows, ends, pos = [], [], 0
    lines = data.splitlines(keepends=True)
    for n, line in enumerate(lines, start=1):
        pos += len(line)
        if not line.strip():
            continue
        try:
            row = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            row = None
        if row is None and n == len(lines):
            break  # torn by a kill mid-write
        if not isinstance(row, dict) or "input_sha256" not in row:
            raise KeelError(f"{path} line {n} is not a keel label row; pass a new out (or delete the file)",
                            field="out")
        rows.append(row)
        ends.append(pos)
    if all_traces and rows:
        last = rows[-1]["input_sha256"]
        group = [r for r in rows if r["input_sha256"] == last]
        if len(group) != group[0].get("trace_rows", 1):
            rows, ends = rows[:-len(group)], ends[:-len(group)]
    return rows, (ends[-1] if ends else 0)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows as one write, flushed and fsynced: after a kill they are there or torn at the end."""
    append_durably(path, _jsonl(rows))


def read_rows(path: Path) -> list[dict]:
    """All rows of a label file (.jsonl or .parquet); [] if it does not exist."""
    if not path.exists():
        return []
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise KeelError(f"cannot read {path} as Parquet ({type(e).__name__}); check the file") from None
    return recover(path)[0]


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replace `path` with `rows` (JSONL, or Parquet by suffix), atomically."""
    if path.suffix.lower() != ".parquet":
        atomic_write(path, _jsonl(rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = dict.fromkeys(k for r in rows for k in r)  # from_pylist would take the first row's keys only
    try:
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise KeelError(f"cannot write {path} as Parquet ({e}); the question file's extra fields "
                        "need one type per column, or set format to jsonl", field="format") from None
