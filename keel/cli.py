"""The `keel` command: a thin typer layer over the library. No logic lives here."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from keel.errors import KeelError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train reasoning LMs with RL from verifiable rewards; serve them anywhere.")

TASK_HELP = "arithmetic | countdown | a .jsonl/.parquet file with question/answer columns"
OPTION_HELP = "task option KEY=VALUE, repeatable (e.g. -o digits=4, -o question_key=problem)"


def _options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KeelError(f"task option {pair!r} is not KEY=VALUE: write e.g. -o digits=4")
        options[key] = yaml.safe_load(value)
    return options


def _stage_config(cls, recipe: Optional[Path], **flags):
    from keel.config import load_recipe, override

    cfg = load_recipe(recipe, cls) if recipe else cls()
    return override(cfg, **flags)


def _train(train, cfg, model: Path, out: Path) -> None:
    """Load `model`, run a training stage on it, write OUT/model; a finished run is never overwritten."""
    from keel.models import load_model, save_model

    if (out / "model").exists() and any((out / "model").iterdir()):
        raise KeelError(f"{out}/model already exists: pass a new --out, or delete it to train again")
    m, tokenizer = load_model(model)
    train(m, tokenizer, cfg, out)
    save_model(m, tokenizer, out / "model")
    typer.echo(f"wrote {out / 'model'}")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="run folder (overwritten)"),
         recipe: Optional[Path] = typer.Option(None, help="a demo recipe (default: the embedded one, recipes/demo.yaml)"),
         device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | npu | xpu | mps")):
    """Build a small model, SFT it, RL it, evaluate before and after; write a report to OUT."""
    from keel.config import DemoConfig, load_recipe
    from keel.demo import run_demo

    cfg = load_recipe(recipe, DemoConfig) if recipe else DemoConfig()
    if device:
        cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), device=device) for s in ("sft", "rl", "eval")})
    report = run_demo(cfg, out)
    typer.echo(json.dumps({"sft": {"pass@1": report["sft"]["pass@1"]}, "rl": {"pass@1": report["rl"]["pass@1"]},
                           "wall_s": round(report["wall_s"], 1), "out": str(out)}))


@app.command("init-model")
def init_model_cmd(out: Path = typer.Option(..., help="directory to write the HF model to"),
                   arch: str = typer.Option("qwen3", help="qwen3 | llama"),
                   layers: int = typer.Option(4), hidden: int = typer.Option(128, help="a multiple of 32"),
                   seed: int = typer.Option(0)):
    """Make a small model from scratch, with a character-level tokenizer built locally."""
    from keel.models import init_model, save_model

    model, tokenizer = init_model(arch, layers, hidden, seed)
    save_model(model, tokenizer, out)
    typer.echo(f"wrote {out} ({sum(p.numel() for p in model.parameters())} parameters)")


@app.command()
def data(task: str = typer.Option(..., help=TASK_HELP), out: Path = typer.Option(..., help="JSONL file to write"),
         split: str = typer.Option("train", help="train | test"), n: int = typer.Option(100),
         seed: int = typer.Option(0), option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP)):
    """Write a task's rows (question, answer, trace and task fields) as JSONL."""
    from keel.tasks import get_task

    if split not in ("train", "test"):
        raise KeelError(f"--split must be train or test, not {split!r}")
    rows = [ex.to_row() for ex in get_task(task, **_options(option)).examples(split, n, seed=seed)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    typer.echo(f"wrote {len(rows)} {split} rows to {out}")


@app.command("sft")
def sft_cmd(model: Path = typer.Option(..., help="HF model directory to start from"),
            out: Path = typer.Option(..., help="run folder; the trained model goes to OUT/model"),
            recipe: Optional[Path] = typer.Option(None, help="YAML with SFT settings (see recipes/)"),
            task: Optional[str] = typer.Option(None, help=TASK_HELP),
            option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP),
            steps: Optional[int] = None, device: Optional[str] = None, seed: Optional[int] = None):
    """Cold-start supervised training on reasoning traces (loss on completions only)."""
    from keel.config import SFTConfig
    from keel.sft import sft

    cfg = _stage_config(SFTConfig, recipe, task=task, task_options=_options(option) or None,
                        steps=steps, device=device, seed=seed)
    _train(sft, cfg, model, out)


@app.command("rl")
def rl_cmd(model: Path = typer.Option(..., help="HF model directory to start from (usually an SFT model)"),
           out: Path = typer.Option(..., help="run folder; the trained model goes to OUT/model"),
           recipe: Optional[Path] = typer.Option(None, help="YAML with RL settings (see recipes/)"),
           task: Optional[str] = typer.Option(None, help=TASK_HELP),
           option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP),
           loss: Optional[str] = typer.Option(None, help="grpo | dr_grpo | dapo | gspo"),
           steps: Optional[int] = None, group_size: Optional[int] = None,
           device: Optional[str] = None, seed: Optional[int] = None):
    """RL from verifiable rewards with the GRPO family."""
    from keel.config import RLConfig
    from keel.rl.trainer import rl

    cfg = _stage_config(RLConfig, recipe, task=task, task_options=_options(option) or None, loss=loss,
                        steps=steps, group_size=group_size, device=device, seed=seed)
    _train(rl, cfg, model, out)


@app.command("eval")
def eval_cmd(model: Path = typer.Option(..., help="HF model directory"),
             task: str = typer.Option("arithmetic", help=TASK_HELP),
             option: Optional[list[str]] = typer.Option(None, "-o", "--option", help=OPTION_HELP),
             recipe: Optional[Path] = typer.Option(None, help="YAML with eval settings"),
             n: Optional[int] = None, k: Optional[int] = None, device: Optional[str] = None, seed: Optional[int] = None):
    """Print JSON with pass@1 (greedy) and pass@k (sampled) on the task's test split."""
    from keel.config import EvalConfig
    from keel.device import pick_device
    from keel.evaluate import evaluate
    from keel.models import load_model

    cfg = _stage_config(EvalConfig, recipe, task=task, task_options=_options(option) or None,
                        n=n, k=k, device=device, seed=seed)
    m, tokenizer = load_model(model, pick_device(cfg.device))
    result = evaluate(m, tokenizer, cfg)
    result.pop("examples")
    typer.echo(json.dumps(result))


def main() -> None:
    try:
        app(standalone_mode=False)
    except KeelError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
