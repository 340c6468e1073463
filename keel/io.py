"""The one way keel writes files and folders: to a temporary name beside the target, fsynced,
then renamed over it. A reader (or a process killed mid-write) sees the old version or the new
one, never half of one.

Only regular files and folders that keel wrote are ever replaced: a target that is a symlink, a
device or a folder where a file is expected is refused with a KeelError, so `--out /dev/stdout`
cannot turn the system's link into a plain file. Every folder keel publishes carries a marker
naming its kind (MARKER); an existing non-empty folder without the marker of the kind being
written is replaced only when the caller says overwrite, and a folder being read never.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from keel.errors import KeelError


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(path: Path, folder: bool = False) -> None:
    """KeelError unless `path` is absent or the kind of thing keel would write there."""
    kind_ok = path.is_dir() if folder else path.is_file()
    if path.is_symlink() or (path.exists() and not kind_ok):
        what = "a folder" if folder else "a regular file"
        raise KeelError(f"{path} exists and is not {what} keel wrote; pass another output path")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (pyarrow,
    matplotlib, csv); on success it is fsynced and renamed to `path`, on failure removed. The
    temporary name keeps the suffix, so writers that pick a format by it still do."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` (text is written as UTF-8)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def append_durably(path: str | Path, text: str) -> None:
    """Append `text` in one write, flushed and fsynced: after a kill it is there, or torn at the end."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def truncate_durably(path: str | Path, size: int) -> None:
    """Cut `path` back to `size` bytes (a journal's torn tail), fsynced; nothing when it has that size."""
    path = Path(path)
    if path.exists() and path.stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())


MARKER = ".keel-output"  # in every folder keel publishes: its kind ("model", "onnx", "checkpoint", ...)


def output_kind(folder: Path) -> str | None:
    """The kind of keel output `folder` is (what its marker says), None when keel did not mark it."""
    try:
        return (Path(folder) / MARKER).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def check_out_folder(out: str | Path, kind: str, overwrite: bool = False, inputs=()) -> None:
    """KeelError unless keel may replace `out` with a `kind` folder. It may when `out` is absent,
    an empty folder, or a `kind` folder keel wrote (its marker says so); any other folder only with
    `overwrite`. Never when `out` is, or holds, one of `inputs` (the folders being read)."""
    out = Path(out)
    check_replaceable(out, folder=True)
    where = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if where == source or where in source.parents:
            raise KeelError(f"{out} would replace the input {source}: write the output to another folder", field="out")
    if overwrite or not out.exists() or output_kind(out) == kind or not any(out.iterdir()):
        return
    raise KeelError(f"{out} exists and is not a keel {kind!r} output: pass a new or empty folder, or set "
                    "overwrite to replace it and everything in it", field="overwrite")


def temp_folder(out: str | Path, kind: str, overwrite: bool = False, inputs=()) -> Path:
    """A fresh private folder beside `out` to build it in (after `check_out_folder`); hand it to
    `publish_folder` with the same arguments."""
    out = Path(out)
    check_out_folder(out, kind, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


def publish_folder(tmp: Path, out: Path, kind: str, overwrite: bool = False, inputs=()) -> None:
    """Mark the finished folder `tmp` as a `kind` output, fsync its files, then put it in place of
    `out` (see `check_out_folder` for what may be replaced). The old `out` is swapped out in one
    atomic step where the system allows it (else renamed aside, then the new one renamed in), and
    only removed once the new one is in place: a reader, or a crash, finds the old folder or the
    new one, never neither."""
    out = Path(out)
    (tmp / MARKER).write_text(kind + "\n", encoding="utf-8")
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    check_out_folder(out, kind, overwrite, inputs)
    if not out.exists():
        os.replace(tmp, out)
        old = None
    elif _exchange(tmp, out):
        old = tmp  # now holds what was `out`
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old)
