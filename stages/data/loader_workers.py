"""A rank's batch stream built by loader worker processes (the stage's `num_workers`).

`WorkerStream(make, rank, world, num_workers)` starts a torch DataLoader whose worker w runs
`make(w, num_workers)`: an LMBatchIterator for slot rank * num_workers + w of world * num_workers
(its own share of every source) that builds only the micro-batches `owns` gives it, i.e. the
rank's own micro-batches round-robin over the workers, which is the order the DataLoader hands
them out in. The loop sees the same interface as a plain iterator: None for another rank's
micro-batch, a batch for its own, and a JSON `state_dict()`: each worker sends its stream's state
with every batch, and the state of the last batch *taken* from each worker (not of the ones
prefetched) is what a checkpoint keeps, so a restore restarts the workers exactly there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def _as_is(item: Any) -> Any:
    return item


class _Workers(IterableDataset):
    def __init__(
        self, make: Callable[[int, int], Iterator], num_workers: int, states: list[dict | None], rotation: int
    ):
        self.make, self.num_workers, self.states, self.rotation = make, num_workers, states, rotation

    def __iter__(self):
        # the DataLoader takes from its workers 0, 1, ... in turn; after a restore the next batch
        # is due from logical worker `rotation`, so DataLoader worker j plays worker j + rotation
        w = (get_worker_info().id + self.rotation) % self.num_workers
        it = self.make(w, self.num_workers)
        if self.states[w] is not None:
            it.load_state_dict(self.states[w])
        while True:
            batch = next(it)
            if batch is not None:
                yield batch, w, it.state_dict()


class WorkerStream(Iterator):
    """See the module docstring."""

    def __init__(self, make: Callable[[int, int], Iterator], rank: int, world: int, num_workers: int):
        if num_workers < 1:
            raise ValueError("WorkerStream needs num_workers >= 1 (0 = build in the loop's process)")
        self.make, self.rank, self.world, self.num_workers = make, rank, world, num_workers
        self.step, self.own = 0, 0
        self.states: list[dict | None] = [None] * num_workers
        self._it: Iterator | None = None

    def _start(self) -> None:
        ds = _Workers(self.make, self.num_workers, list(self.states), self.own % self.num_workers)
        self._it = iter(
            DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is, prefetch_factor=2
            )
        )

    def __next__(self):
        mine = self.step % self.world == self.rank
        self.step += 1
        if not mine:
            return None  # another rank's micro-batch
        if self._it is None:
            self._start()
        assert self._it is not None  # _start sets it
        batch, w, state = next(self._it)
        self.states[w], self.own = state, self.own + 1
        return batch

    def _total(self, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.states:
            for n, v in ((s or {}).get(key) or {}).items():
                out[n] = out.get(n, 0) + v
        return out

    @property
    def tokens_by_source(self) -> dict[str, int]:
        return self._total("tokens")

    @property
    def docs_by_source(self) -> dict[str, int]:
        return self._total("docs")

    @property
    def skipped(self) -> int:
        return sum(int((s or {}).get("skipped", 0)) for s in self.states)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "own": self.own,
            "rank": self.rank,
            "world": self.world,
            "num_workers": self.num_workers,
            "workers": list(self.states),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position (also from the per-rank list a data-parallel job saves); saved
        with another world size or worker count, rebuild it by drawing as many micro-batches."""
        if "ranks" in state:
            if len(state["ranks"]) != self.world:
                return self._replay(int(state["ranks"][0]["step"]))
            state = state["ranks"][self.rank]
        if (state.get("world"), state.get("rank"), state.get("num_workers")) != (
            self.world,
            self.rank,
            self.num_workers,
        ) or "workers" not in state:
            return self._replay(int(state["step"]))
        self.step, self.own = int(state["step"]), int(state["own"])
        self.states = list(state["workers"])
        self._it = None

    def _replay(self, steps: int) -> None:
        for _ in range(steps):
            next(self)
