"""Verifiable tasks: examples with reference answers and rewards that check completions."""

from keel.tasks.base import Example, Task, get_task

__all__ = ["Example", "Task", "get_task"]
