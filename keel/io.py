"""The one way keel writes files and folders: to a temporary name beside the target, fsynced,
then renamed over it. A reader (or a process killed mid-write) sees the old version or the new
one, never half of one.

Only regular files and folders that keel wrote are ever replaced: a target that is a symlink, a
device or a folder where a file is expected is refused with a KeelError, so `--out /dev/stdout`
cannot turn the system's link into a plain file.
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


def temp_folder(out: str | Path) -> Path:
    """A fresh private folder beside `out` to build it in; hand it to `publish_folder`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(out, folder=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def publish_folder(tmp: Path, out: Path) -> None:
    """fsync every file of the finished folder `tmp`, then swap it in for `out` (a folder keel
    wrote earlier, or nothing)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    check_replaceable(out, folder=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_path(out.parent)
