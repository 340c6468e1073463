"""Task names to tasks: the built-in generators, the `math` preset over a MATH-style dataset, or a
local dataset (a .jsonl/.parquet file, a folder of shards, a `save_to_disk` folder)."""

from __future__ import annotations

import inspect
from pathlib import Path

from keel.errors import KeelError
from keel.tasks.arithmetic import ArithmeticTask
from keel.tasks.base import Task
from keel.tasks.countdown import CountdownTask
from keel.tasks.files import DATA_SUFFIXES, FileTask, MathTask

BUILTIN_TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "math": MathTask}


def is_dataset_path(name: str) -> bool:
    """Whether a task name is a dataset's path rather than a task's name."""
    return name.lower().endswith(DATA_SUFFIXES) or "/" in name or "\\" in name or Path(name).is_dir()


def get_task(name: str, **options) -> Task:
    """A task by name ("arithmetic", "countdown", "math" with option path=...) or a local dataset
    file or folder (FileTask). `options` are the task's keyword arguments (e.g. digits=3); None
    values mean "the default"."""
    if not isinstance(name, str):
        raise KeelError(f"task must be a name or a file path, got {name!r}")
    if name in BUILTIN_TASKS:
        cls, args = BUILTIN_TASKS[name], ()
    elif is_dataset_path(name):
        cls, args = FileTask, (name,)
    else:
        raise KeelError(
            f"unknown task {name!r}; use one of {', '.join(BUILTIN_TASKS)} or a path to a .jsonl/.parquet file "
            "or a dataset folder"
        )
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and (p != "path" or not args)]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise KeelError(
            f"task {cls.__name__} has no option(s) {', '.join(unknown)}; its options are {', '.join(params)}"
        )
    return cls(*args, **{k: v for k, v in options.items() if v is not None})
