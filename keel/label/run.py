"""One labelling job: read the questions, skip the ones already written, sample k traces per
question a chunk at a time, label and append them; then the summary and the agreement plot."""

from __future__ import annotations

import time
from pathlib import Path

from keel.config import LabelConfig
from keel.errors import KeelError
from keel.io import truncate_durably
from keel.label.journal import LabelFiles, append_rows, read_rows, recover, write_rows
from keel.label.provenance import chunk_seed, input_hash, job_spec, make_rows, model_fingerprint, sampling_fields, utc_now
from keel.label.questions import Question, read_questions
from keel.label.votes import METHODS, decide, make_verifier


def _sample(model, tokenizer, questions: list[Question], cfg: LabelConfig, seed: int):
    """k traces per question, one batch: (texts, mean token log-probs), question-major."""
    from keel.completions import complete  # torch loads in seconds: only once the cheap checks passed
    from keel.device import make_generator
    from keel.engine.sampler import SamplingParams

    out = complete(model, tokenizer, [q.question for q in questions],
                   SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens), k=cfg.k,
                   generator=make_generator(next(model.parameters()).device, seed))
    return out.texts, out.mean_logprobs()


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
                        "questions; rerun with the same arguments to resume, or pass a new out", field="out")
    files.out.parent.mkdir(parents=True, exist_ok=True)
    truncate_durably(files.journal, keep)
    truncate_durably(files.unlabelled, keep_u)

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
                    rows = make_rows(questions[i], label, hashes[i], prov, cfg.all_traces, utc_now())
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
    """Write `agreement_figure` to `path`."""
    from keel.report import save_figure

    return save_figure(agreement_figure(rows, k), path)


def agreement_figure(rows: list[dict], k: int):
    """Questions by how many of their k samples were accepted: agreeing with the majority label, or
    correct where a reference answer was given (verified and unverified rows)."""
    from matplotlib.ticker import MaxNLocator

    from keel.report import plt  # Agg backend, set there

    qs = per_question(rows)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    # One bar per method at each count of accepted samples 0..k, side by side in distinct colours
    # (overlapping translucent histograms hid each other); counts are whole questions.
    groups = [("majority: samples agreeing", ("majority",), "tab:blue"),
              ("with a reference: samples correct", ("verified", "unverified"), "tab:orange")]
    width, tallest = 0.8 / len(groups), 1
    for g, (label, methods, colour) in enumerate(groups):
        accepted = [round(r["confidence"] * k) for r in qs if r.get("method") in methods]
        if accepted:
            counts = [accepted.count(j) for j in range(k + 1)]
            xs = [j + (g - (len(groups) - 1) / 2) * width for j in range(k + 1)]
            ax.bar(xs, counts, width=width, color=colour, label=f"{label} ({len(accepted)} questions)")
            tallest = max(tallest, *counts)
    ax.set_ylim(0, tallest * 1.5 + 0.5)  # room for the legend above the bars
    ax.set_xticks(range(k + 1))
    ax.set_xlim(-0.5, k + 0.5)
    ax.set_xlabel(f"accepted samples of k={k}")
    ax.set_ylabel("questions")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("label agreement")
    ax.grid(alpha=0.3, axis="y")
    if ax.patches:
        ax.legend(fontsize=8, loc="upper center")
    return fig
