"""Packing in the grain pipeline: the `(example, component, index, valid)` stream -> packed
`Batch`es (`pam_jax.data.pipeline` module doc, `pam_jax.data.batch.collate_packed`).

Samples are taken in stream order and placed by `FirstFit` into `batch_size` rows; the first
sample that fits no row closes the batch and is carried to the next one. `get_state` is the
upstream state from before the carried sample was read, so restoring it (also in a new
process) re-reads that sample and continues with exactly the next batch.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import grain

from pam_jax.data.batch import Batch, FirstFit, collate_packed


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """What a packed batch is: `batch_size` rows of `capacity` positions, at most `pack_max`
    samples a row; `collate_kw` goes to `collate_packed`."""

    batch_size: int
    capacity: int
    pack_max: int
    drop_remainder: bool
    collate_kw: dict[str, Any]


class PackIterDataset(grain.IterDataset):
    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        batch_size: int,
        capacity: int,
        pack_max: int,
        drop_remainder: bool,
        collate_kw: dict[str, Any],
    ):
        super().__init__(parent)
        self._spec = PackSpec(batch_size, capacity, pack_max, drop_remainder, collate_kw)

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._spec)


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: PackSpec):
        super().__init__(parent)
        self._b, self._cap, self._k = spec.batch_size, spec.capacity, spec.pack_max
        self._drop, self._collate_kw = spec.drop_remainder, spec.collate_kw
        self._carry: tuple[Any, Any] | None = None  # (sample, upstream state before it)

    def __next__(self) -> Batch:
        ff, items, ended = FirstFit(self._b, self._cap, self._k), [], False
        while True:
            if self._carry is not None:
                (item, state), self._carry = self._carry, None
            else:
                state = copy.deepcopy(self._parent.get_state())  # it may be updated in place
                try:
                    item = next(self._parent)
                except StopIteration:
                    ended = True
                    break
            if not ff.add(len(items), item[0].length):
                self._carry = (item, state)
                break
            items.append(item)
        if not items or (ended and self._drop):
            raise StopIteration
        if not all(x[3] for x in items):  # pipeline tops up shares only for finite multi-process
            raise ValueError("packing got a share top-up row (finite multi-process stream)")
        return collate_packed(
            [x[0] for x in items], ff.bins, pack_max=self._k, batch_size=self._b,
            source_index=[x[1] for x in items], record_index=[x[2] for x in items],
            **self._collate_kw,
        )  # fmt: skip

    def get_state(self) -> Any:
        return self._carry[1] if self._carry is not None else self._parent.get_state()

    def set_state(self, state: Any) -> None:
        self._parent.set_state(state)
        self._carry = None
