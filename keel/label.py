"""Label questions with the model itself: verifier-checked rejection sampling, majority votes,
a review queue for people, and provenance on every row.

For each question k traces are sampled. With a reference answer the verifier keeps the correct
ones (rejection sampling, as R1's SFT data was made): the label is the reference, `confidence` the
share of correct samples. Without one, the extracted answers vote (self-consistency): the label is
the winner, `confidence` its share of the k votes, and low agreement, ties and unanswered questions
are flagged for review.

Rules, all deterministic:
- Votes are counted on a canonical key (`answer_key`): numbers by exact value ("1,000", "1000.0"
  and "1000" vote together; "0.5" and "1/2" too), other answers without whitespace, case or `$`.
  Symbolically equal spellings ("x+1", "1+x") vote apart.
- A tie goes to the answer whose first vote came earliest in sample order, and is flagged.
- The best trace of a question is, among its accepted traces, R1-formatted ones first, then the
  one whose tokens the model was surest of (highest mean log-prob), the earliest sample on a tie.
  Shortest-correct would favour bare guesses ("<think></think><answer>42</answer>") over working.
- `--all-traces` writes each distinct accepted trace, best first, one row each.

Files. OUT holds one row per labelled question (or per accepted trace), every row with an answer,
so `keel sft` and `keel rl` read it as a dataset. Questions that no sample answered go to the
sibling `<stem>.unlabelled.jsonl` for review. Rows are appended and fsynced as they are made
(Parquet output collects them in `<name>.partial.jsonl` and converts at the end).

Resume. Each row carries `input_sha256`, a hash of everything that decides it: the question and
reference, the model's files, the sampling settings, k, the seed and the verifier. A run started
again with the same arguments skips the questions whose hash is already written, after cutting off
a line torn by a kill. Sampling is seeded per chunk of `batch_questions` questions in file order,
from the chunk's hashes, so a chunk's traces do not depend on where an earlier run stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from keel.config import LabelConfig
from keel.errors import KeelError
from keel.tasks import Example, get_task
from keel.tasks.files import _gsm8k_answer, _read_rows
from keel.tasks.verify import answers_match, extract_answer, format_reward, parse_number

METHODS = ("verified", "majority", "human")


# ----------------------------------------------------------------------------- questions


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
        raise KeelError(f"questions file {path} must be .jsonl or .parquet (one question per line or row)")
    rows, columns = _read_rows(path)
    if not rows:
        raise KeelError(f"questions file {path} has no rows; give it one {{\"question\": ...}} per line")
    if question_key not in columns:
        raise KeelError(f"{path} has no column {question_key!r} (columns: {', '.join(map(str, columns))}); "
                        "name the question column with --question-key")
    out, seen = [], set()
    for where, row in rows:
        q = row.get(question_key)
        if q is None or isinstance(q, (dict, list)) or not str(q).strip():
            raise KeelError(f"{path} {where} has no question in {question_key!r}; fill it in or drop the row")
        q = str(q)
        if q in seen:
            continue
        seen.add(q)
        a = row.get(answer_key)
        reference = _gsm8k_answer(str(a)) if a is not None and str(a).strip() else None
        extra = {k: v for k, v in row.items() if k not in (question_key, answer_key)}
        out.append(Question(q, reference, extra))
    return out


# ----------------------------------------------------------------------------- votes (pure)


def answer_key(answer: str | None) -> str | None:
    """Canonical form of an extracted answer for counting votes; None for no answer. Numbers become
    their exact value ("1,000" -> "1000", "0.50" -> "1/2"), other text loses whitespace, case,
    `$` and a trailing full stop."""
    if not isinstance(answer, str) or not answer.strip():
        return None
    number = parse_number(answer)
    if number is not None:
        return str(number)
    key = "".join(answer.replace("$", "").split()).lower().rstrip(".")
    return key or None


@dataclass(frozen=True)
class Vote:
    answer: str | None        # the winning answer_key; None when no sample had an answer
    votes: int                # samples that gave it
    samples: int              # k: every sample counts, answered or not
    members: tuple[int, ...]  # indices of the samples that gave it, in order
    tie: bool                 # another answer had as many votes

    @property
    def confidence(self) -> float:
        return self.votes / self.samples if self.samples else 0.0


def majority_vote(answers: list[str | None]) -> Vote:
    """Majority over the canonical keys of `answers`; ties go to the answer whose first vote is
    earliest. confidence = votes / len(answers)."""
    keys = [answer_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return Vote(None, 0, len(answers), (), False)
    top = max(counts.values())
    winners = [k for k in dict.fromkeys(keys) if k is not None and counts[k] == top]  # first-seen order
    winner = winners[0]
    return Vote(winner, top, len(answers), tuple(i for i, k in enumerate(keys) if k == winner), len(winners) > 1)


def flag_reason(vote: Vote, threshold: float) -> str | None:
    """Why a majority label needs a person: "no answer", "tie", "low agreement" (confidence below
    `threshold`); None when it does not."""
    if vote.answer is None:
        return "no answer"
    if vote.tie:
        return "tie"
    if vote.confidence < threshold:
        return "low agreement"
    return None


def rank_traces(indices, texts: list[str], mean_logps: list[float]) -> list[int]:
    """`indices` best first: R1 format before none, then higher mean token log-prob; ties keep
    sample order (the sort is stable)."""
    return sorted(indices, key=lambda i: (-format_reward(texts[i]), -mean_logps[i]))


# ----------------------------------------------------------------------------- one question's label


@dataclass(frozen=True)
class Label:
    method: str                # verified | majority
    answer: str | None         # the label; None when nothing was answered
    traces: list[str]          # distinct accepted traces, best first
    confidence: float          # share of the k samples accepted
    accepted: int              # samples accepted (correct, or voting with the majority)
    flag: str | None           # why a person should look, or None


Verifier = Callable[[str, Question], bool]


def make_verifier(task: str | None = None, options: dict | None = None) -> Verifier:
    """`verify(trace, question)`: the task's reward says correct (countdown checks the expression
    against the row's numbers and target); without a task, the extracted answer matches the
    reference as a number, symbolically or as text. Never raises."""
    if task is None:
        return lambda text, q: answers_match(extract_answer(text), q.reference)
    t = get_task(task, **(options or {}))

    def verify(text: str, q: Question) -> bool:
        try:
            return t.reward(text, Example(q.question, q.reference, meta=q.extra))["correct"] == 1
        except Exception:  # a task's reward must not take labelling down
            return False
    return verify


def decide(q: Question, texts: list[str], mean_logps: list[float], verify: Verifier, threshold: float) -> Label:
    """Label one question from its k sampled `texts` (and their mean token log-probs)."""
    k = len(texts)
    if q.reference is not None:
        accepted = [i for i, t in enumerate(texts) if verify(t, q)]
        method, answer, flag = "verified", q.reference, None
    else:
        vote = majority_vote([extract_answer(t) for t in texts])
        accepted, method, flag = list(vote.members), "majority", flag_reason(vote, threshold)
        answer = None
    ranked = rank_traces(accepted, texts, mean_logps)
    if method == "majority" and ranked:
        answer = extract_answer(texts[ranked[0]]).strip()  # the label as the best trace spells it
    traces = list(dict.fromkeys(texts[i] for i in ranked))
    return Label(method, answer, traces, len(accepted) / k if k else 0.0, len(accepted), flag)


# ----------------------------------------------------------------------------- provenance


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


# ----------------------------------------------------------------------------- files


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
            raise KeelError(f"--format must be jsonl or parquet, not {fmt!r}")
        if (fmt == "parquet") != is_parquet or out.suffix.lower() not in (".jsonl", ".parquet"):
            raise KeelError(f"--out {out} does not fit --format {fmt}: name it *.{fmt}")
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
            raise KeelError(f"{path} line {n} is not a keel label row; pass a new --out (or delete the file)")
        rows.append(row)
        ends.append(pos)
    if all_traces and rows:
        last = rows[-1]["input_sha256"]
        group = [r for r in rows if r["input_sha256"] == last]
        if len(group) != group[0].get("trace_rows", 1):
            rows, ends = rows[:-len(group)], ends[:-len(group)]
    return rows, (ends[-1] if ends else 0)


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows as one write, flushed and fsynced: after a kill they are there or torn at the end."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


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
    """Replace `path` with `rows` (JSONL, or Parquet by suffix): temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = dict.fromkeys(k for r in rows for k in r)  # from_pylist would take the first row's keys only
        try:
            pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), tmp)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            tmp.unlink(missing_ok=True)
            raise KeelError(f"cannot write {path} as Parquet ({e}); the question file's extra fields "
                            "need one type per column, or use --format jsonl") from None
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the labelling loop


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sample(model, tokenizer, questions: list[Question], cfg: LabelConfig, seed: int):
    """k traces per question, one batch: (texts, mean token log-probs), question-major."""
    from keel.device import make_generator
    from keel.models import render_prompt, special_ids
    from keel.rollout import SamplingParams, generate

    eos, pad = special_ids(tokenizer)
    prompts = [render_prompt(tokenizer, q.question) for q in questions for _ in range(cfg.k)]
    generator = make_generator(next(model.parameters()).device, seed)
    out = generate(model, prompts, SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens),
                   eos_id=eos, pad_id=pad, generator=generator)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    return texts, [sum(lp) / max(1, len(lp)) for lp in out.logprobs]


def label_file(model_dir: str | Path, questions_path: str | Path, out: str | Path,
               cfg: LabelConfig = LabelConfig(), fmt: str | None = None, model=None, tokenizer=None) -> dict:
    """Label every question of `questions_path` with the model in `model_dir` into `out`; resumes
    where an earlier run with the same arguments stopped. Returns the summary (see `summarize`).
    `model`/`tokenizer`, when given, must be the ones in `model_dir` (saves loading it again)."""
    files = LabelFiles.at(out, fmt)
    questions = read_questions(questions_path, cfg.question_key, cfg.answer_key)
    verify = make_verifier(cfg.task, cfg.task_options)
    journal, keep = recover(files.journal, cfg.all_traces)
    unlabelled, keep_u = recover(files.unlabelled)
    existing = read_rows(files.out) if files.parquet else []
    # torch and transformers load in seconds: only once the cheap checks have passed.
    from keel.device import pick_device
    from keel.models import check_model_dir, load_model
    from keel.runlog import console, progress

    model_dir = check_model_dir(model_dir)
    job = job_spec(cfg, model_fingerprint(model_dir))
    hashes = [input_hash(q, job) for q in questions]
    done = {r.get("input_sha256") for r in journal + unlabelled + existing}
    foreign = done - set(hashes)
    if foreign:
        raise KeelError(f"{files.out} holds {len(foreign)} question(s) labelled with other settings, model or "
                        "questions; rerun with the same arguments to resume, or pass a new --out")
    files.out.parent.mkdir(parents=True, exist_ok=True)
    _truncate(files.journal, keep)
    _truncate(files.unlabelled, keep_u)

    todo = [i for i, h in enumerate(hashes) if h not in done]
    if todo:
        console.print(f"label: {len(todo)} of {len(questions)} questions to do, k={cfg.k}"
                      + (f" ({len(questions) - len(todo)} done already)" if len(todo) < len(questions) else ""))
        if model is None:
            model, tokenizer = load_model(model_dir, pick_device(cfg.device))
        prov = {"samples": cfg.k, "model": str(model_dir), "model_sha256": job["model_sha256"],
                "verifier": cfg.task or "answers_match", "sampling": sampling_fields(cfg)}
        t0, n_done, n_accepted = time.time(), 0, 0
        with progress("label", len(todo)) as advance:
            for start in range(0, len(questions), cfg.batch_questions):
                chunk = list(range(start, min(start + cfg.batch_questions, len(questions))))
                pending = [i for i in chunk if hashes[i] not in done]
                if not pending:
                    continue
                texts, logps = _sample(model, tokenizer, [questions[i] for i in chunk], cfg,
                                       chunk_seed([hashes[i] for i in chunk]))
                for j, i in enumerate(chunk):
                    if i not in pending:
                        continue
                    s = slice(j * cfg.k, (j + 1) * cfg.k)
                    label = decide(questions[i], texts[s], logps[s], verify, cfg.threshold)
                    rows = make_rows(questions[i], label, hashes[i], prov, cfg.all_traces, _now())
                    append_rows(files.journal if label.answer is not None else files.unlabelled, rows)
                    n_accepted += label.accepted
                n_done += len(pending)
                advance(len(pending), **{"q/s": n_done / max(time.time() - t0, 1e-9),
                                         "accept": n_accepted / (n_done * cfg.k)})
    if files.parquet and (files.journal.exists() or not files.out.exists()):
        write_rows(files.out, existing + recover(files.journal)[0])
        files.journal.unlink(missing_ok=True)
    rows, unlabelled = read_rows(files.out), read_rows(files.unlabelled)
    return {**summarize(rows, unlabelled), "out": str(files.out),
            "plot": str(plot_agreement(rows + unlabelled, cfg.k, files.plot))}


# ----------------------------------------------------------------------------- summary


def per_question(rows: list[dict]) -> list[dict]:
    """The first row of each question (all-traces files have several)."""
    seen, out = set(), []
    for r in rows:
        if r.get("input_sha256") not in seen:
            seen.add(r.get("input_sha256"))
            out.append(r)
    return out


def summarize(rows: list[dict], unlabelled: list[dict] = ()) -> dict:
    """Counts over a label file: questions per method, with a trace, flagged, unlabelled; the
    share of sampled traces accepted."""
    qs = per_question(list(rows))
    un = per_question(list(unlabelled))
    sampled = sum(r.get("samples", 0) for r in qs + un if r.get("method") != "human")
    accepted = sum(r.get("accepted", 0) for r in qs + un if r.get("method") != "human")
    return {"questions": len(qs) + len(un), "rows": len(rows),
            **{m: sum(r.get("method") == m for r in qs) for m in METHODS},
            "with_trace": sum(r.get("trace") is not None for r in qs),
            "flagged": sum(bool(r.get("flagged")) for r in qs) + len(un), "unlabelled": len(un),
            "accept_rate": accepted / sampled if sampled else 0.0}


def plot_agreement(rows: list[dict], k: int, path: Path) -> Path:
    """Histogram of `confidence` per method: agreement of majority labels, pass rate of verified ones."""
    from keel.report import plt, save_figure  # Agg backend, set there

    qs = per_question(rows)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    bins = [(i - 0.5) / k for i in range(k + 2)]
    for method, label in (("majority", "majority: agreement"), ("verified", "verified: share correct")):
        values = [r["confidence"] for r in qs if r.get("method") == method]
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
    ax.set_xlabel("confidence (accepted samples / k)")
    ax.set_ylabel("questions")
    ax.set_title("label agreement")
    ax.grid(alpha=0.3)
    if ax.patches:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- review


REVIEW_COLUMNS = ["input_sha256", "question", "model_answer", "confidence", "flag_reason", "trace", "human_answer"]


def _review_files(labels: str | Path) -> LabelFiles:
    files = LabelFiles.at(labels)
    if not files.out.exists():
        raise KeelError(f"label file {files.out} does not exist; pass the --out of a `keel label` run")
    if files.parquet and files.journal.exists():
        raise KeelError(f"{files.journal} exists: finish the labelling run (run it again) before reviewing")
    return files


def export_review(labels: str | Path, csv_path: str | Path) -> int:
    """Write the flagged questions of a label file, and its unlabelled ones, to a CSV for people:
    fill in `human_answer`, leave it blank to skip. Returns how many questions were written."""
    files = _review_files(labels)
    items = [r for r in per_question(read_rows(files.out)) if r.get("flagged") and r.get("method") != "human"]
    items += per_question(read_rows(files.unlabelled))
    csv_path = Path(csv_path)
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, REVIEW_COLUMNS)
        w.writeheader()
        for r in items:
            w.writerow({"input_sha256": r["input_sha256"], "question": r["question"], "model_answer": r.get("answer"),
                        "confidence": r.get("confidence"), "flag_reason": r.get("flag_reason"),
                        "trace": r.get("trace"), "human_answer": ""})
    os.replace(tmp, csv_path)
    return len(items)


def read_review(csv_path: str | Path) -> dict[str, str]:
    """{input_sha256: human answer} from a review CSV; blank answers are skipped."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise KeelError(f"review file {csv_path} does not exist; make one with --export")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets add a BOM
            reader = csv.DictReader(f)
            missing = {"input_sha256", "human_answer"} - set(reader.fieldnames or [])
            if missing:
                raise KeelError(f"{csv_path} has no column(s) {', '.join(sorted(missing))}; "
                                "keep the header that --export wrote")
            answers = {}
            for r in reader:
                h, a = (r.get("input_sha256") or "").strip(), (r.get("human_answer") or "").strip()
                if a:
                    if not h:
                        raise KeelError(f"{csv_path} line {reader.line_num} has no input_sha256; keep that column as exported")
                    answers[h] = a
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise KeelError(f"cannot read {csv_path} as CSV ({type(e).__name__}: {e}); save it as UTF-8 CSV") from None
    return answers


def apply_human(rows: list[dict], answer: str, reviewed: str) -> list[dict]:
    """A question's rows relabelled by a person. The model's traces stay when the person agrees
    with the model's answer; otherwise one row without a trace (nothing sampled reached it)."""
    first = rows[0]
    human = {"answer": answer, "method": "human", "confidence": 1.0, "flagged": False, "flag_reason": None,
             "model_answer": first.get("model_answer", first.get("answer")) if first.get("method") == "human"
             else first.get("answer"), "reviewed": reviewed}
    if first.get("trace") is not None and answer_key(answer) == answer_key(first.get("answer")):
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
                        f"(first: {unknown[0][:12]}...); export the review from this label file")
    reviewed, groups = _now(), {}
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
