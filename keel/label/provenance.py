"""What every label row carries about how it was made, and the hashes that make a run resumable.

`input_sha256` hashes everything that decides a row: the question and reference, the model's
files, the sampling settings, k, the seed and the verifier. Sampling is seeded per chunk of
questions from the chunk's hashes, so a chunk's traces do not depend on where an earlier run
stopped.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from keel.config import LabelConfig
from keel.label.questions import Question
from keel.label.votes import Label


def utc_now() -> str:
    """The time stamp of a row (`created`, `reviewed`): UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the names and contents of every file in an HF model directory (weights, config,
    tokenizer, chat template). Reads the weights once: about a second per GB."""
    h = hashlib.sha256()
    root = Path(model_dir)
    files = [p for p in root.rglob("*") if p.is_file()]
    for f in sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def job_spec(cfg: LabelConfig, fingerprint: str) -> dict:
    """Everything besides the question that decides a row."""
    return {"model_sha256": fingerprint, "verifier": cfg.task, "task_options": cfg.task_options,
            "sampling": sampling_fields(cfg), "threshold": cfg.threshold, "all_traces": cfg.all_traces}


def sampling_fields(cfg: LabelConfig) -> dict:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "k": cfg.k, "seed": cfg.seed}


def input_hash(q: Question, job: dict) -> str:
    """Provenance: sha256 of the question, its reference and the job spec (canonical JSON)."""
    payload = json.dumps({"question": q.question, "reference": q.reference, "job": job}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def chunk_seed(hashes: list[str]) -> int:
    """The sampling seed of one chunk of questions: their input hashes decide it."""
    return int(hashlib.sha256("".join(hashes).encode()).hexdigest()[:15], 16)


def make_rows(q: Question, label: Label, h: str, prov: dict, all_traces: bool, created: str) -> list[dict]:
    """The output rows of one question: one (best trace, or none), or with `all_traces` one per
    distinct accepted trace. `trace_rank`/`trace_rows` (all-traces only) let a resume see whether
    all of a question's rows were written."""
    base = {"question": q.question, "answer": label.answer, "trace": None, "method": label.method,
            "confidence": label.confidence, "flagged": label.flag is not None, "flag_reason": label.flag,
            "accepted": label.accepted, **prov, "created": created, "input_sha256": h}
    traces = (label.traces if all_traces else label.traces[:1]) or [None]
    rows = []
    for rank, trace in enumerate(traces):
        row = {**base, "trace": trace}
        if all_traces:
            row.update(trace_rank=rank, trace_rows=len(traces))
        for key, value in q.extra.items():
            row.setdefault(key, value)  # the question file's own fields, unless they clash with ours
        rows.append(row)
    return rows
