"""Merge rows from many requests into forward batches (plain Python; no torch).

A request is split into rows (one text, one document pair, one image, one audio...), each with a
length in tokens (or another cost unit). The batcher hands out a batch when it is worth running:

* ``max_batch_size`` rows are waiting, or
* the padded cost of the waiting rows reaches ``max_batch_tokens``, or
* the oldest row has waited ``max_wait_s``.

With one tenant, a batch always contains the oldest waiting row (no row starves), and is filled
with the rows closest to it in length, so padding stays small (a batch costs ``rows * longest
row``).

With several tenants waiting, rows are shared by **weighted fair share**: each row handed out adds
``length / weight`` to its tenant's service (a tenant that becomes active starts level with the
least served one, so idling banks no credit). A batch starts with the oldest row of the tenant
served least, and each further place goes to the tenant then served least, which gives its row
closest in length to that first one (a tenant whose row would break the token budget sits this
batch out). A tenant flooding the queue therefore cannot hold another's rows back for more than a
batch or two, and weights 3:1 give about 3:1 of the tokens while both wait. The queue
is bounded: ``put`` refuses a request whose rows would overflow ``max_queue_rows`` (the caller
answers 503 before any work is done), and a request's rows are accepted all or none.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lmaas.core.errors import OverloadedError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_size: int = 32
    max_wait_s: float = 0.002
    max_batch_tokens: int = 16384
    """Padded cost (rows * longest row) of one batch."""
    max_queue_rows: int = 4096

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_s * 1e3}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        if self.max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be at least 1, got {self.max_queue_rows}")


@dataclass(slots=True)
class QueuedRow(Generic[T]):
    """One row of one request, waiting for a batch."""

    request_id: str
    index: int
    """Position of the row in its request."""
    length: int
    payload: T
    enqueued_at: float = 0.0
    seq: int = field(default=0, compare=False)
    """Arrival order, set by the batcher."""
    tenant: str = ""
    """Whose request it is (fair share between tenants)."""
    weight: float = 1.0
    """The tenant's share weight."""


class DynamicBatcher(Generic[T]):
    """The queue of rows and the batching policy. Not thread-safe: one owner thread."""

    def __init__(self, config: BatcherConfig, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self._clock = clock or time.monotonic
        self._by_length: list[tuple[int, int]] = []
        """(length, seq) of every waiting row, sorted."""
        self._rows: dict[int, QueuedRow[T]] = {}
        """seq → row, in arrival order (dicts keep insertion order)."""
        self._counter = itertools.count()
        self._num_rows_by_tenant: dict[str, int] = {}
        self._by_tenant: dict[str, list[tuple[int, int]]] = {}
        """(length, seq) of each tenant's waiting rows, sorted."""
        self._service: dict[str, float] = {}
        """Weighted tokens handed out per tenant with waiting rows."""

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, rows: Sequence[QueuedRow[T]]) -> None:
        """Queue every row of one request.

        Raises:
            OverloadedError: the queue cannot take them all (none is queued).
        """
        if len(self._rows) + len(rows) > self.config.max_queue_rows:
            raise OverloadedError(
                f"the batch queue holds {len(self._rows)} rows (limit "
                f"{self.config.max_queue_rows}); retry later",
                retry_after_s=1.0,
            )
        now = self._clock()
        counts = self._num_rows_by_tenant
        for row in rows:
            row.seq = next(self._counter)
            row.enqueued_at = now
            row.length = max(1, row.length)
            if row.weight <= 0:
                row.weight = 1.0
            if row.tenant not in counts:
                self._service[row.tenant] = min(self._service.values(), default=0.0)
                counts[row.tenant] = 0
                self._by_tenant[row.tenant] = []
            counts[row.tenant] += 1
            self._rows[row.seq] = row
            bisect.insort(self._by_length, (row.length, row.seq))
            bisect.insort(self._by_tenant[row.tenant], (row.length, row.seq))

    def _take(self, seq: int, charge: bool) -> QueuedRow[T]:
        """Take a row out of the queue (and out of both length orders)."""
        row = self._rows.pop(seq)
        entry = (row.length, seq)
        del self._by_length[bisect.bisect_left(self._by_length, entry)]
        mine = self._by_tenant[row.tenant]
        del mine[bisect.bisect_left(mine, entry)]
        counts = self._num_rows_by_tenant
        counts[row.tenant] -= 1
        if charge:
            self._service[row.tenant] += row.length / row.weight
        if not counts[row.tenant]:
            del counts[row.tenant]
            del self._service[row.tenant]
            del self._by_tenant[row.tenant]
        return row

    def _anchor(self) -> QueuedRow[T]:
        """The oldest row of the tenant served least (the oldest row with one tenant)."""
        rows = iter(self._rows.values())
        if len(self._num_rows_by_tenant) == 1:
            return next(rows)
        service = self._service
        tenant = min(self._num_rows_by_tenant, key=lambda name: service[name])
        return next(row for row in rows if row.tenant == tenant)

    def remove(self, request_id: str) -> int:
        """Drop the waiting rows of a request (it was aborted); returns how many."""
        gone = [seq for seq, row in self._rows.items() if row.request_id == request_id]
        for seq in gone:
            self._take(seq, charge=False)
        return len(gone)

    def wait_s(self) -> float | None:
        """Seconds until a batch is due; 0 when one is ready now; None when the queue is empty."""
        if not self._rows:
            return None
        if self._full():
            return 0.0
        oldest = next(iter(self._rows.values()))
        return max(0.0, oldest.enqueued_at + self.config.max_wait_s - self._clock())

    def next_batch(self, force: bool = False) -> list[QueuedRow[T]]:
        """The next batch if one is due (or any waiting rows when ``force``), else ``[]``."""
        wait = self.wait_s()
        if wait is None or (wait > 0 and not force):
            return []
        if len(self._num_rows_by_tenant) > 1:
            return self._fair_batch()
        anchor = next(iter(self._rows.values()))
        pos = bisect.bisect_left(self._by_length, (anchor.length, anchor.seq))
        lo, hi = pos, pos + 1  # the window [lo, hi) of rows nearest in length to the anchor
        longest = anchor.length
        budget = self.config.max_batch_tokens
        while hi - lo < self.config.max_batch_size:
            below = self._by_length[lo - 1][0] if lo > 0 else None
            above = self._by_length[hi][0] if hi < len(self._by_length) else None
            if below is None and above is None:
                break
            size = hi - lo
            if below is None or above is None:
                take_above = below is None
            else:
                # Padding added: upwards every row in the window pads to the new longest;
                # downwards only the new row pads.
                take_above = size * (above - longest) <= longest - below
            new_longest = max(longest, above) if take_above and above is not None else longest
            if (size + 1) * new_longest > budget:
                break
            if take_above:
                hi, longest = hi + 1, new_longest
            else:
                lo -= 1
        batch = [self._take(seq, charge=True) for _, seq in self._by_length[lo:hi]]
        batch.sort(key=lambda row: row.seq)
        return batch

    def _fair_batch(self) -> list[QueuedRow[T]]:
        """A batch when several tenants wait: each place to the tenant served least."""
        anchor = self._anchor()
        target = longest = anchor.length
        batch = [self._take(anchor.seq, charge=True)]
        budget = self.config.max_batch_tokens
        service = self._service
        sitting_out: set[str] = set()
        while len(batch) < self.config.max_batch_size:
            tenants = [t for t in self._num_rows_by_tenant if t not in sitting_out]
            if not tenants:
                break
            tenant = min(tenants, key=lambda name: service[name])
            mine = self._by_tenant[tenant]
            i = bisect.bisect_left(mine, (target, -1))
            # the row nearest in length to the first one; on a tie the shorter (no extra padding)
            near = mine[max(0, i - 1) : i + 1]
            length, seq = min(near, key=lambda entry: (abs(entry[0] - target), entry[0]))
            if (len(batch) + 1) * max(longest, length) > budget:
                sitting_out.add(tenant)
                continue
            longest = max(longest, length)
            batch.append(self._take(seq, charge=True))
        batch.sort(key=lambda row: row.seq)
        return batch

    def _full(self) -> bool:
        if len(self._rows) >= self.config.max_batch_size:
            return True
        longest = self._by_length[-1][0]
        return len(self._rows) * longest >= self.config.max_batch_tokens
