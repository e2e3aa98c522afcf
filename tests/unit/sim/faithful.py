"""A simulated Cassandra node closer to the real one where `SimCassandra` differs in ways
that matter to the exactly-once argument (red team findings, see
tests/unit/test_redteam_sim_fidelity.py):

- An acknowledged batch is applied: Cassandra answers a batch once every mutation reached
  its consistency level. `SimCassandra.write` answers after applying ONE partition's
  share; a coordinator crash in the next 2 ms then cuts the others (an UNLOGGED batch's
  are lost, a LOGGED batch's replayed 4-14 s later) although the client holds an
  acknowledgement. Here the answer waits for the last share; a crash before it answers
  WriteTimeout (BATCH or UNLOGGED_BATCH: outcome unknown), as the driver would report.
  Harsher than real, the old behaviour makes the simulation report breaks the worker
  does not have (an acknowledged claim lost: tests/unit/test_simulation.py's
  test_batches_the_database_finds_too_large_are_split, seed 2793669686).
- A LOGGED batch that timed out is applied by the batchlog replay 4 to 14 s later (2 x
  write_request_timeout, scanned every 10 s), not within 0-3 s. Kinder than real, the old
  timing lets the next writer read after the late batch landed almost always.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cassandra import WriteTimeout, WriteType

from tests.unit.sim.cassandra import SimCassandra, _Request
from tests.unit.simdb import Mutation, RecordedBatch

Pending = tuple[list[list[Mutation]], bool]


class _Awaiting:
    """The answer to a batch whose shares are still being applied."""

    def __init__(self) -> None:
        self.answer: Callable[[BaseException | None], None] | None = None


@dataclass
class FaithfulCassandra(SimCassandra):
    _awaiting: dict[int, tuple[Pending, _Awaiting]] = field(default_factory=dict)

    def _serve(self, request: _Request) -> None:
        try:
            result, error = request.work(), None
        except Exception as exc:  # noqa: BLE001 - the node answers with the error
            result, error = None, exc
        if isinstance(result, _Awaiting):
            result.answer = lambda failure: self._answer(request, None, failure)
            return
        self._answer(request, result, error)

    def write(self, batch: RecordedBatch) -> Any:
        known = {id(pending) for pending in self._applying}
        super().write(batch)
        started = [pending for pending in self._applying if id(pending) not in known]
        if not started:
            return None  # one partition: applied, answered now
        awaiting = _Awaiting()
        self._awaiting[id(started[0])] = (started[0], awaiting)
        return awaiting

    def _share(self, pending: Pending, share: list[Mutation]) -> None:
        super()._share(pending, share)
        entry = self._awaiting.get(id(pending))
        if entry is not None and not pending[0]:
            del self._awaiting[id(pending)]
            _tell(entry[1], None)

    def crash_coordinator(self, restart_after: float) -> None:
        cut = [entry for entry in self._awaiting.values() if entry[0][0]]
        self._awaiting.clear()
        super().crash_coordinator(restart_after)
        for (_, logged), awaiting in cut:
            kind = WriteType.BATCH if logged else WriteType.UNLOGGED_BATCH
            _tell(awaiting, WriteTimeout("coordinator lost before every replica answered",
                                         write_type=kind))

    def _apply_later(self, batch: RecordedBatch, logged: bool) -> None:
        mutations = batch.mutations()
        delay = self.rng.uniform(4.0, 14.0) if logged else self.rng.uniform(0.0, 3.0)

        def land() -> None:
            self.late_cells_lost += self.db.apply(mutations)

        self.world.after(delay, land)


def _tell(awaiting: _Awaiting, failure: BaseException | None) -> None:
    if awaiting.answer is not None:
        awaiting.answer(failure)
