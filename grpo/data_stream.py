"""The order in which prompts are visited: reproducible, resumable, sharded by rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0  # next position in this epoch's permutation


class PromptStream(Generic[T]):
    """Cycles through `items` in a fresh seeded permutation per epoch.

    Each call to `next_batch` consumes `per_rank * world_size` consecutive prompts of the
    global order; rank r takes the r-th slice. Prompts (not completions) are sharded, so the
    G completions of a prompt always live on one rank. The position is the whole state:
    saving and restoring it resumes the exact order.
    """

    def __init__(self, items: list[T], seed: int, rank: int, world_size: int) -> None:
        if not items:
            raise ValueError("no prompts to train on")
        self.items, self.seed, self.rank, self.world_size = items, seed, rank, world_size
        self.position = StreamPosition()

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def next_batch(self, per_rank: int) -> list[T]:
        taken: list[T] = []
        needed = per_rank * self.world_size
        while len(taken) < needed:
            order = self._order(self.position.epoch)
            chunk = order[self.position.index : self.position.index + needed - len(taken)]
            taken.extend(self.items[i] for i in chunk)
            self.position.index += len(chunk)
            if self.position.index >= len(order):
                self.position = StreamPosition(self.position.epoch + 1, 0)
        return taken[self.rank * per_rank : (self.rank + 1) * per_rank]
