"""Verifiable tasks: examples with reference answers and rewards that check completions."""

from keel.tasks.base import Example, Task
from keel.tasks.registry import get_task

__all__ = ["Example", "Task", "get_task"]
