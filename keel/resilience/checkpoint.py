"""Atomic, checksummed, exact checkpoints.

A checkpoint is a folder `checkpoints/<step>/` holding
  tensors.safetensors  every tensor of the run (model, optimizer moments, reference model, RNG
                       states as uint8), flat keys like `model/lm_head.weight`
  state.json           everything else (step, data cursors, optimizer hyper-parameters, Python
                       and NumPy RNG states, guard windows), plain JSON
  manifest.json        the step, and SHA-256 and size of every other file
(and keel.io's marker). Under `sync: fsdp` (any number of ranks, one included, so that a run can
resume on another number) the model, optimizer and every other tensor that is the same across
ranks are not gathered: each rank writes its own shards through torch.distributed.checkpoint
(DCP) into a subfolder
  dcp/                 DCP's `.metadata` and one `__<rank>_<n>.distcp` per writing rank, keyed by
                       parameter name, so DCP can load them onto any number of ranks (resharding);
                       under DiLoCo over FSDP each group's model and optimizer under `group<g>.`
                       (keel.distributed.sync.ShardedDiLoCo), resumed in the same layout only
and tensors.safetensors keeps only what differs between ranks (RNG states, ...). Every rank
writes into the same temporary folder, so a run on several machines needs the checkpoint folder
on a filesystem they share (as torchtitan assumes).

A checkpoint is written into a temporary folder, each file fsynced; rank 0 adds the manifest and
renames the folder into place once every rank's shards are written, so a reader sees a whole
checkpoint or none; a temporary folder left by a crash is never taken for one, and is removed.
Loading verifies a checkpoint first against what a checkpoint is, not against what its manifest
claims: exactly these files, regular files inside the folder, the manifest naming every one with
the folder's step, the hashes, and the files readable as what they are. A checkpoint that fails
any check is reported in events.jsonl and the next older one is used. The step is the folder's
name (`step_of`). Nothing is unpickled but DCP's `.metadata`, and that only after its checksum
passed and through an unpickler that admits DCP's own metadata classes and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import metadata as dcp_metadata

from keel.errors import KeelError
from keel.io import MARKER, publish_folder

FILES = ("tensors.safetensors", "state.json")
MANIFEST = "manifest.json"
SHARDS = "dcp"  # the subfolder of a sharded checkpoint (sync: fsdp), written by every rank through DCP
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")  # DCP's name for a rank's file
KIND = "checkpoint"  # keel.io's marker in a checkpoint folder
STEP_DIGITS = 8
TEMP = re.compile(rf"\.tmp-\d{{{STEP_DIGITS}}}(-\d+)?")  # a checkpoint being written (or left by a crash)


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


def temp_path(folder: Path, step: int) -> Path:
    """Where step `step`'s checkpoint is written before it is renamed into place: the same name on
    every rank, as all of them write into it."""
    return Path(folder) / f".tmp-{folder_name(step)}"


def remove_temp_folders(folder: Path) -> None:
    """Remove the temporary folders of checkpoints whose writing never finished (a crash)."""
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if TEMP.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)


def write(folder: Path, step: int, flat: dict[str, torch.Tensor], state: dict, tmp: Path | None = None) -> Path:
    """Write one checkpoint atomically; returns its final path. `tmp` is the temporary folder the
    ranks have already written their shards into (sharded layout), else it is made here."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / folder_name(step)
    if tmp is None:
        tmp = temp_path(folder, step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    elif missing := missing_shards(tmp / SHARDS):  # the other ranks wrote them somewhere else
        raise KeelError(f"rank 0 does not see {len(missing)} of the ranks' checkpoint shards (e.g. {missing[0]}) in "
                        f"{tmp}: on several machines, out must be on a filesystem they all share", field="out")
    save_file(flat, tmp / "tensors.safetensors")
    (tmp / "state.json").write_text(json.dumps(state))
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    # fsyncs the files; a rollback that re-reached this step replaces the old copy (the run's own)
    publish_folder(tmp, final, KIND, overwrite=True)
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit DCP's metadata classes, torch's sizes, dtypes and
    layouts and a path, nothing that could run code."""

    def find_class(self, module: str, name: str):
        defined = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        allowed = (isinstance(defined, type) and defined.__module__ == module  # its classes, not what it imports
                   or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                         ("torch", "Size"), ("torch.serialization", "_get_layout"),
                                         ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")
        return super().find_class(module, name)


class ShardReader(dcp.FileSystemReader):
    """DCP's reader, with the restricted unpickler for `.metadata`."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError("the DCP metadata is not a Metadata object")
        # keel writes tensors only; DCP would torch.load(weights_only=False) an entry stored as bytes
        if not all(isinstance(m, dcp_metadata.TensorStorageMetadata) for m in metadata.state_dict_metadata.values()):
            raise pickle.UnpicklingError("the DCP metadata names an entry that is not a tensor")
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def shard_group():
    """A process group of its own for DCP's collectives (gloo: they carry small plans; a background
    write must not share a group with the training's collectives); None in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None


def save_shards(tmp: Path, shards: dict, group, background: bool):
    """Every rank: write this rank's shards of `shards` (a nested dict of tensors and DTensors)
    into `tmp/dcp`. Returns DCP's future when `background` (the copy to host memory is done when
    this returns), else None once every rank's files are written."""
    writer = dcp.FileSystemWriter(tmp / SHARDS)
    kwargs = dict(storage_writer=writer, process_group=group, no_dist=group is None)
    with _quiet():
        if background:
            return dcp.async_save(shards, **kwargs)
        dcp.save(shards, **kwargs)
    return None


def load_shards(path: Path, targets: dict, group) -> None:
    """Every rank: fill `targets` (a nested dict of tensors or DTensors shaped like what was saved,
    in any sharding) in place from checkpoint `path`'s DCP files."""
    with _quiet():
        dcp.load(targets, storage_reader=ShardReader(Path(path) / SHARDS), process_group=group, no_dist=group is None)


@contextlib.contextmanager
def _quiet():
    """keel passes no_dist itself where there is no process group (one process); DCP warns all the same."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def missing_shards(shards: Path) -> list[str]:
    """The files DCP's `.metadata` in `shards` names that are not there (or could not be: a name
    DCP does not give, such as one outside the folder, is never looked up)."""
    named = {info.relative_path for info in ShardReader(shards).read_metadata().storage_data.values()}
    return sorted(name for name in named if not (SHARD_FILE.fullmatch(name) and (shards / name).is_file()))


def _expected(path: Path, present: set[str]) -> tuple[set[str], str | None]:
    """The files a checkpoint holding `present` must list in its manifest, or what is wrong."""
    files = set(FILES)
    if SHARDS in present:
        shards = path / SHARDS
        if shards.is_symlink() or not shards.is_dir():
            return files, f"{SHARDS} is not a folder"
        names = {p.name for p in shards.iterdir()}
        if ".metadata" not in names or not any(SHARD_FILE.fullmatch(n) for n in names):
            return files, f"{SHARDS} lacks DCP's .metadata or its shard files"
        if any(n != ".metadata" and not SHARD_FILE.fullmatch(n) for n in names):
            return files, f"{SHARDS} holds file(s) DCP does not write"
        files |= {f"{SHARDS}/{n}" for n in names}
    return files, None


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
        if present - expected - {SHARDS}:
            return f"{len(present - expected - {SHARDS})} file(s) a checkpoint does not have"
        files, problem = _expected(path, present)
        if problem:
            return problem
        if any((path / name).is_symlink() or not (path / name).is_file() for name in files | {MANIFEST}):
            return "a checkpoint file is a link or not a regular file"
        manifest = json.loads((path / MANIFEST).read_text())
        entries = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(entries, dict) or set(entries) != files:
            return "the manifest does not list exactly the checkpoint's files"
        if manifest.get("step") != step:
            return f"the manifest's step is not the folder's ({step})"
        for name in sorted(files):
            entry = entries[name]
            if not isinstance(entry, dict) or (path / name).stat().st_size != entry.get("bytes"):
                return f"{name} has the wrong size"
            if _sha256(path / name) != entry.get("sha256"):
                return f"{name} fails its checksum"
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            return "state.json is not a JSON object"
        if ("sharded" in state) != (SHARDS in present):
            return f"state.json and the {SHARDS} folder disagree on whether the checkpoint is sharded"
        with safe_open(path / "tensors.safetensors", framework="pt") as f:
            f.keys()
        if SHARDS in present and (missing := missing_shards(path / SHARDS)):
            return f"{SHARDS}/{missing[0]} missing (named by DCP's .metadata)"
    except Exception as e:  # OSError, bad JSON, deep nesting, safetensors' or DCP's own header errors, ...
        return f"unreadable checkpoint ({type(e).__name__})"
    return None


def read(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The tensors in tensors.safetensors and state.json (a sharded checkpoint's DCP part is read
    by `load_shards`, collectively)."""
    return unflatten(load_file(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def listing(folder: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of, reverse=True)


class Checkpointer:
    """Saves every `every` steps and/or `seconds` seconds, keeps the newest `keep`, optionally
    writing in the background after a synchronous copy to host memory.

    Every rank calls `save`; `main` (rank 0) writes the gathered tensors and state, the manifest
    and renames the folder into place. With `shards` (sync: fsdp) every rank first writes its own
    shards through DCP, over `group` (`shard_group`), into the same temporary folder."""

    def __init__(self, folder: Path, log, every: int = 0, seconds: float = 0.0, keep: int = 3, background: bool = False,
                 main: bool = True, group=None):
        self.folder, self.log, self.every, self.seconds, self.keep = Path(folder), log, every, seconds, keep
        self.background, self.main, self.group = background, main, group
        self._thread: threading.Thread | None = None
        self._future = None  # this rank's background DCP write, on the ranks other than main
        self._last_time = time.monotonic()
        self.on_saved = None  # fault injection hook: called with the new checkpoint's path

    def due(self, step: int, final: bool = False) -> bool:
        if final:
            return bool(self.every or self.seconds)
        if self.every and step % self.every == 0:
            return True
        return bool(self.seconds) and time.monotonic() - self._last_time >= self.seconds

    def save(self, step: int, tensors: dict | None, state: dict | None, shards: dict | None = None) -> None:
        """`tensors` and `state` on main (None elsewhere); `shards` on every rank, or None on every rank."""
        t0 = time.perf_counter()
        self.wait()
        # with DCP's copy to host memory below, all the loop waits for in background mode
        flat = flatten(tensors) if self.main else None
        tmp, future = None, None
        if shards is not None:
            tmp = temp_path(self.folder, step)
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            if self.group is not None:
                dist.barrier(group=self.group)  # nobody writes before the old temp folder is gone
            future = save_shards(tmp, shards, self.group, self.background)
        if not self.main:
            self._future = future
        elif self.background:
            self._thread = threading.Thread(target=self._write, args=(step, flat, state, t0, tmp, future), daemon=True)
            self._thread.start()
        else:
            self._write(step, flat, state, t0, tmp)
        self.log.event("checkpoint_blocking", step=step, seconds=time.perf_counter() - t0)
        self._last_time = time.monotonic()

    def _write(self, step, flat, state, t0, tmp=None, future=None) -> None:
        if future is not None:
            future.result()  # every rank's shards are written (DCP's last collective) before the rename
        path = write(self.folder, step, flat, state, tmp)
        for old in listing(self.folder)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        self.log.event("checkpoint", step=step, seconds=time.perf_counter() - t0, path=str(path))
        if self.on_saved:
            self.on_saved(path)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._future is not None:
            self._future.result()
            self._future = None

    def latest_path(self) -> Path | None:
        """The newest checkpoint that verifies, or None. Bad ones are logged; temporary folders of
        checkpoints never finished are removed (nothing is being written while this runs)."""
        self.wait()
        remove_temp_folders(self.folder)
        for path in listing(self.folder):
            problem = verify(path)
            if problem is None:
                return path
            self.log.event("corrupt_checkpoint", path=str(path), problem=problem)
        return None
