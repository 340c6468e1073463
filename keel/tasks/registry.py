"""Task names to tasks: the built-in generators, or a local dataset file."""

from __future__ import annotations

import inspect

from keel.errors import KeelError
from keel.tasks.arithmetic import ArithmeticTask
from keel.tasks.base import Task
from keel.tasks.countdown import CountdownTask
from keel.tasks.files import FileTask

BUILTIN_TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def get_task(name: str, **options) -> Task:
    """A task by name ("arithmetic", "countdown") or a local .jsonl/.parquet file (FileTask).
    `options` are the task's keyword arguments (e.g. digits=3); None values mean "the default"."""
    if not isinstance(name, str):
        raise KeelError(f"task must be a name or a file path, got {name!r}")
    if name.lower().endswith((".jsonl", ".parquet")):
        cls, args = FileTask, (name,)
    elif name in BUILTIN_TASKS:
        cls, args = BUILTIN_TASKS[name], ()
    else:
        raise KeelError(
            f"unknown task {name!r}; use one of {', '.join(BUILTIN_TASKS)} or a path to a .jsonl/.parquet file"
        )
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "path")]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise KeelError(
            f"task {cls.__name__} has no option(s) {', '.join(unknown)}; its options are {', '.join(params)}"
        )
    return cls(*args, **{k: v for k, v in options.items() if v is not None})
