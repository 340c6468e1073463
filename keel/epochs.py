"""Endless seeded passes over a list, reshuffled each epoch. (epoch, cursor) is the whole state,
so a checkpoint records two integers and a resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import random


class Epochs:
    def __init__(self, items, seed: int):
        self.items, self.seed = items, seed
        self.seek(0, 0)

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def seek(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = self._shuffle()

    def peek(self):
        """The next item, starting a new epoch first if this one is used up."""
        if self.cursor == len(self._order):
            self.seek(self.epoch + 1, 0)
        return self.items[self._order[self.cursor]]

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            out.append(self.peek())
            self.cursor += 1
        return out
