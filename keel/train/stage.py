"""A training stage as `keel sft` and `keel rl` run it: a model directory in, `OUT/model` out."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

from keel.distributed import shutdown
from keel.distributed.sync import full_state
from keel.distributed.world import elastic_restart, main_process
from keel.errors import KeelError
from keel.models import add_lora, is_lora, load_model, lora_base, merge_lora, save_adapter, save_model
from keel.resilience.checkpoint import listing, step_of
from keel.resilience.state import is_sharded

# (model, tokenizer, stage config, run folder) -> metrics rows: keel.train.sft.sft, keel.rl.trainer.rl
Train = Callable[[object, object, object, Path], list]


def check_unfinished(out: str | Path) -> None:
    """A finished run (its OUT/model written) is never trained over."""
    final = Path(out) / "model"
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise KeelError(f"{final} already exists: pass a new out folder, or delete it to train again", field="out")


def check_fresh_start(out: str | Path, resume: bool, fresh: bool) -> None:
    """A run folder's checkpoints are never replaced by accident: with checkpoints in OUT a run
    needs --resume (continue from them) or --fresh (start over; the loop deletes them). A group
    torchrun restarted resumes by itself."""
    found = listing(Path(out) / "checkpoints")
    if found and not resume and not fresh and not elastic_restart():
        raise KeelError(f"{out} has checkpoints up to step {step_of(found[0])}: add --resume to continue from "
                        "them, or --fresh to start over and delete them")


def interrupted(out: str | Path, argv: list[str]) -> str:
    """What to tell a person who pressed Ctrl-C in `keel <argv>`: where the newest checkpoint is
    and the command that continues from it."""
    found = listing(Path(out) / "checkpoints")
    args = [a for a in argv if a not in ("--resume", "--fresh")]
    launcher = "torchrun ... -m keel" if "WORLD_SIZE" in os.environ else "keel"
    if not found:
        return ("interrupted before the first checkpoint (--checkpoint-every N writes them); start again with:\n"
                f"  {launcher} {shlex.join(args)}")
    return (f"interrupted; the newest checkpoint is {found[0]} (step {step_of(found[0])}). Continue with:\n"
            f"  {launcher} {shlex.join(args + ['--resume'])}")


def plain_copy(model_dir: str | Path, cfg, weights: dict):
    """The model of `model_dir` (with `cfg.lora`'s adapters) holding `weights`, a trained model's
    full state by name: a sharded model's, gathered, as a plain module that saves as any other."""
    model, _ = load_model(model_dir)
    if getattr(cfg, "lora", None) is not None:
        model = add_lora(model, cfg.lora, cfg.seed)
    lora_base(model).load_state_dict(weights)
    return model


def train_stage(train: Train, cfg, model_dir: str | Path, out: str | Path) -> Path | None:
    """Load `model_dir`, train it with `train` under `cfg` into the run folder `out`, and write the
    result to OUT/model (a plain HF directory); returns its path. Under torchrun every rank trains
    and rank 0 writes the model (the others return None). Under fsdp the trained model is left
    sharded: its full weights are gathered to rank 0 (a collective, before the process group
    goes) and loaded into a plain copy of `model_dir` (with the same adapters under LoRA).
    With `cfg.lora` the adapters train on the frozen base: rank 0 writes them to OUT/adapter (peft's
    format), then merges them in, so OUT/model is a plain HF directory that needs no peft. Each
    folder is written atomically; OUT/model last, as it marks the run finished."""
    out = Path(out)
    check_unfinished(out)
    model, tokenizer = load_model(model_dir)
    if getattr(cfg, "lora", None) is not None:
        model = add_lora(model, cfg.lora, cfg.seed)  # the trainer's own wrapping, done here to keep the wrapper
    try:
        train(model, tokenizer, cfg, out)
        sharded = is_sharded(lora_base(model))
        weights = full_state(lora_base(model), main_only=True) if sharded else None
    finally:
        shutdown()
    if not main_process():
        return None
    if sharded:
        model = plain_copy(model_dir, cfg, weights)
    if is_lora(model):
        save_adapter(model, out / "adapter")
        model = merge_lora(model)
    return save_model(model, tokenizer, out / "model")
