"""Atomic, checksummed, exact checkpoints.

A checkpoint is a folder `checkpoints/<step>/` holding
  tensors.safetensors  every tensor of the run (model, optimizer moments, reference model, RNG
                       states as uint8), flat keys like `model/lm_head.weight`
  state.json           everything else (step, data cursors, optimizer hyper-parameters, Python
                       and NumPy RNG states, guard windows), plain JSON
  manifest.json        the step, and SHA-256 and size of the two files above
(and keel.io's marker). It is written into a temporary folder, each file fsynced, then renamed into
place, so a reader sees a whole checkpoint or none. Loading verifies it first against what a
checkpoint is, not against what its manifest claims: exactly these files, regular files inside the
folder, the manifest naming both with the folder's step, the hashes, and both files readable as
what they are. A checkpoint that fails any check is reported in events.jsonl and the next older one
is used. The step is the folder's name (`step_of`). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from keel.io import MARKER, publish_folder

FILES = ("tensors.safetensors", "state.json")
MANIFEST = "manifest.json"
KIND = "checkpoint"  # keel.io's marker in a checkpoint folder
STEP_DIGITS = 8


def folder_name(step: int) -> str:
    """The name of step `step`'s checkpoint folder."""
    return f"{step:0{STEP_DIGITS}d}"


def step_of(path: str | Path) -> int | None:
    """The step of the checkpoint folder `path`, read from its name; None unless the name is one
    `folder_name` gives (so `folder_name(step_of(p)) == p.name`: "1" or "0001" is no checkpoint)."""
    name = Path(path).name
    if len(name) != STEP_DIGITS or not (name.isascii() and name.isdigit()):
        return None
    return int(name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten(tree: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"model": {"w": t}} -> {"model/w": t}, contiguous CPU copies (safetensors needs them and the
    async writer must not see later in-place updates)."""
    return {f"{group}/{name}": t.detach().to("cpu", copy=True).contiguous()
            for group, tensors in tree.items() for name, t in tensors.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    tree: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        tree.setdefault(group, {})[name] = t
    return tree


def write(folder: Path, step: int, flat: dict[str, torch.Tensor], state: dict) -> Path:
    """Write one checkpoint atomically; returns its final path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / folder_name(step)
    tmp = folder / f".tmp-{folder_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(flat, tmp / "tensors.safetensors")
    (tmp / "state.json").write_text(json.dumps(state))
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    # fsyncs the files; a rollback that re-reached this step replaces the old copy (the run's own)
    publish_folder(tmp, final, KIND, overwrite=True)
    return final


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it (naming only a checkpoint's own
    files: nothing outside the folder is ever looked at, so nothing about it can be reported)."""
    path = Path(path)
    step = step_of(path)
    if step is None:
        return f"the folder name is not a step ({STEP_DIGITS} digits)"
    try:
        if path.is_symlink() or not path.is_dir():
            return "not a folder (a link, or a file)"
        present = {p.name for p in path.iterdir()} - {MARKER}
        expected = {*FILES, MANIFEST}
        if expected - present:
            return f"{', '.join(sorted(expected - present))} missing"
        if present - expected:
            return f"{len(present - expected)} file(s) a checkpoint does not have"
        if any((path / name).is_symlink() or not (path / name).is_file() for name in expected):
            return "a checkpoint file is a link or not a regular file"
        manifest = json.loads((path / MANIFEST).read_text())
        entries = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(entries, dict) or set(entries) != set(FILES):
            return f"the manifest does not list exactly {', '.join(FILES)}"
        if manifest.get("step") != step:
            return f"the manifest's step is not the folder's ({step})"
        for name in FILES:
            entry = entries[name]
            if not isinstance(entry, dict) or (path / name).stat().st_size != entry.get("bytes"):
                return f"{name} has the wrong size"
            if _sha256(path / name) != entry.get("sha256"):
                return f"{name} fails its checksum"
        if not isinstance(json.loads((path / "state.json").read_text()), dict):
            return "state.json is not a JSON object"
        with safe_open(path / "tensors.safetensors", framework="pt") as f:
            f.keys()
    except Exception as e:  # OSError, bad JSON, deep nesting, safetensors' own header errors, ...
        return f"unreadable checkpoint ({type(e).__name__})"
    return None


def read(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    return unflatten(load_file(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def listing(folder: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of, reverse=True)


class Checkpointer:
    """Saves every `every` steps and/or `seconds` seconds, keeps the newest `keep`, optionally
    writing in a background thread after a synchronous copy to host memory."""

    def __init__(self, folder: Path, log, every: int = 0, seconds: float = 0.0, keep: int = 3, background: bool = False):
        self.folder, self.log, self.every, self.seconds, self.keep = Path(folder), log, every, seconds, keep
        self.background = background
        self._thread: threading.Thread | None = None
        self._last_time = time.monotonic()
        self.on_saved = None  # fault injection hook: called with the new checkpoint's path

    def due(self, step: int, final: bool = False) -> bool:
        if final:
            return bool(self.every or self.seconds)
        if self.every and step % self.every == 0:
            return True
        return bool(self.seconds) and time.monotonic() - self._last_time >= self.seconds

    def save(self, step: int, tensors: dict, state: dict) -> None:
        t0 = time.perf_counter()
        flat = flatten(tensors)  # the only part the training loop waits for in background mode
        self.wait()
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(step, flat, state, t0), daemon=True)
            self._thread.start()
        else:
            self._write(step, flat, state, t0)
        self.log.event("checkpoint_blocking", step=step, seconds=time.perf_counter() - t0)
        self._last_time = time.monotonic()

    def _write(self, step, flat, state, t0) -> None:
        path = write(self.folder, step, flat, state)
        for old in listing(self.folder)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        self.log.event("checkpoint", step=step, seconds=time.perf_counter() - t0, path=str(path))
        if self.on_saved:
            self.on_saved(path)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def latest_path(self) -> Path | None:
        """The newest checkpoint that verifies, or None. Bad ones are logged."""
        self.wait()
        for path in listing(self.folder):
            problem = verify(path)
            if problem is None:
                return path
            self.log.event("corrupt_checkpoint", path=str(path), problem=problem)
        return None
