"""Expert iteration: the model labels questions, learns from the labels it can trust, gets better.

One round, as in STaR / rejection-sampling fine-tuning:
1. evaluate the model on the task's test split;
2. draw train questions, hiding their answers unless told otherwise, and label them with `keel
   label` (majority vote of k samples, or the verifier when answers are shown);
3. fine-tune on the best trace of every label that is not flagged for review;
4. evaluate again and write report.json / report.md with the gain.

Hidden answers make it a fair test of labelling without people: the true answers are used only
to report how many of the training traces were in fact correct (`trace_precision`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from keel.config import ExpertIterationConfig
from keel.device import pick_device
from keel.errors import KeelError
from keel.evaluate import evaluate
from keel.io import atomic_write
from keel.label import label_file, per_question, read_rows
from keel.models import load_model, save_model
from keel.report import plot, write_json
from keel.runlog import RunLog, console, read_jsonl
from keel.train.sft import sft
from keel.tasks import get_task


def _write_jsonl(rows: list[dict], path: Path) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def expert_iteration(cfg: ExpertIterationConfig, model_dir: str | Path, out: str | Path,
                     device: str | None = None) -> dict:
    """One round of expert iteration on `model_dir`; the fine-tuned model goes to OUT/model."""
    out = Path(out)
    if (out / "model").exists():
        raise KeelError(f"{out}/model already exists: pass a new out, or delete it to run again", field="out")
    if device:
        cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), device=device)
                                          for s in ("label", "sft", "eval")})
    t0 = time.time()
    task = get_task(cfg.task, **cfg.task_options)
    examples = task.examples("train", cfg.questions, seed=cfg.question_seed)
    out.mkdir(parents=True, exist_ok=True)
    RunLog(out, fresh=True).close()
    questions = out / "questions.jsonl"
    hidden = ("trace", "answer") if cfg.hide_answers else ("trace",)
    _write_jsonl([{k: v for k, v in ex.to_row().items() if k not in hidden} for ex in examples], questions)

    model, tokenizer = load_model(model_dir, pick_device(cfg.eval.device))
    eval_cfg = cfg.stage("eval")
    before = evaluate(model, tokenizer, eval_cfg)
    console.print(f"before: pass@1 {before['pass@1']:.3f}  pass@{eval_cfg.k} {before[f'pass@{eval_cfg.k}']:.3f}")

    labels = label_file(model_dir, questions, out / "labels.jsonl", cfg.stage("label"), model=model, tokenizer=tokenizer)
    keep = [r for r in per_question(read_rows(out / "labels.jsonl")) if r["trace"] is not None and not r["flagged"]]
    if not keep:
        raise KeelError("no label was accepted, so there is nothing to fine-tune on: label more questions, "
                        "raise label.k, or start from a stronger SFT model")
    truth = {ex.question: ex for ex in examples}
    correct = sum(task.reward(r["trace"], truth[r["question"]])["correct"] for r in keep)
    train = out / "train.jsonl"
    _write_jsonl([{"question": r["question"], "answer": r["answer"], "trace": r["trace"]} for r in keep], train)
    console.print(f"labels: {len(keep)} accepted traces of {len(examples)} questions, {correct / len(keep):.1%} correct")

    sft_cfg = dataclasses.replace(cfg.sft, task=str(train), task_options={"test_fraction": 0.0}, examples=len(keep))
    sft(model, tokenizer, sft_cfg, out)
    after = evaluate(model, tokenizer, eval_cfg)
    console.print(f"after:  pass@1 {after['pass@1']:.3f}  pass@{eval_cfg.k} {after[f'pass@{eval_cfg.k}']:.3f}")
    save_model(model, tokenizer, out / "model")

    report = {"task": cfg.task, "task_options": cfg.task_options, "model": str(model_dir),
              "device": str(pick_device(cfg.eval.device)), "wall_s": time.time() - t0,
              "questions": len(examples), "hide_answers": cfg.hide_answers, "labels": labels,
              "train_traces": len(keep), "trace_precision": correct / len(keep),
              "before": before, "after": after, "gain_pass@1": after["pass@1"] - before["pass@1"],
              "config": dataclasses.asdict(cfg)}
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("stage") == "sft" and r.get("loss") is not None]
    plots = [Path(labels["plot"])] + ([plot(rows, ["loss"], "fine-tuning loss", out / "sft_loss.png")] if rows else [])
    write_json(report, out / "report.json")
    _write_markdown(report, plots, out / "report.md")
    console.print(f"expert iteration: {report['gain_pass@1'] * 100:+.1f} points of test pass@1; report in {out / 'report.md'}")
    return report


def _write_markdown(report: dict, plots: list[Path], path: Path) -> None:
    b, a, lab = report["before"], report["after"], report["labels"]
    k = next(key for key in a if key.startswith("pass@") and key != "pass@1")
    how = "majority vote, answers hidden" if report["hide_answers"] else "verified against the answers"
    lines = [
        "# keel expert iteration report", "",
        f"Task: `{report['task']}` {report['task_options']}; model: `{report['model']}`; "
        f"{report['wall_s'] / 60:.1f} min on {report['device']}.", "",
        f"Labelled {report['questions']} train questions ({how}): {lab['flagged']} flagged for review, "
        f"{report['train_traces']} traces kept for fine-tuning, {report['trace_precision']:.1%} of them correct "
        f"(sample acceptance {lab['accept_rate']:.1%}).", "",
        f"| model | pass@1 (greedy) | {k} | format |", "|---|---|---|---|",
        f"| before | {b['pass@1']:.3f} | {b[k]:.3f} | {b['format']:.3f} |",
        f"| after expert iteration | {a['pass@1']:.3f} | {a[k]:.3f} | {a['format']:.3f} |", "",
        f"Test pass@1 changed by **{report['gain_pass@1'] * 100:+.1f} points**.", "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write(path, "\n".join(lines) + "\n")
