"""Atomic, checksummed, exact checkpoints.

A checkpoint is a folder `checkpoints/<step>/` holding
  tensors.safetensors  every tensor of the run (model, optimizer moments, reference model, RNG
                       states as uint8), flat keys like `model/lm_head.weight`
  state.json           everything else (step, data cursors, optimizer hyper-parameters, Python
                       and NumPy RNG states, guard windows), plain JSON
  manifest.json        SHA-256 and size of the two files above
It is written into a temporary folder, each file fsynced, then renamed into place, so a reader
sees a whole checkpoint or none. Loading verifies the manifest first; a torn or corrupted
checkpoint is reported and the next older one is used. Nothing is ever unpickled.
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
from safetensors.torch import load_file, save_file

from keel.io import publish_folder

FILES = ("tensors.safetensors", "state.json")


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
    final = folder / f"{step:08d}"
    tmp = folder / f".tmp-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(flat, tmp / "tensors.safetensors")
    (tmp / "state.json").write_text(json.dumps(state))
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    publish_folder(tmp, final)  # fsyncs the files; a rollback that re-reached this step replaces the old copy
    return final


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for name, entry in manifest["files"].items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if (path / name).stat().st_size != entry["bytes"]:
                return f"{name} has the wrong size"
            if _sha256(path / name) != entry["sha256"]:
                return f"{name} fails its checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    return None


def read(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    return unflatten(load_file(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def listing(folder: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name), reverse=True)


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
