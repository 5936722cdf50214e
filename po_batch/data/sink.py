"""One Parquet part per unit, committed atomically under a deterministic name, then the unit's done marker.

Readers of pyarrow.dataset.dataset(OUT) see only whole parts: a part becomes visible at once (the store's writer
commits it), and state lives in '_po_batch/', which pyarrow skips. A rerun of a unit replaces its part, so each
row appears once whatever crashed where; a worker that lost its claim or whose plan was replaced commits nothing,
and never deletes or (where the store can fence it, see Writer.commit) replaces what the unit's new owner did.
"""

import time

import pyarrow as pa
import pyarrow.parquet as pq

from po_batch.data.claims import Claims
from po_batch.data.layout import CLAIMS_DIR, DONE_DIR, FAILED_DIR, STATE_DIR, part_name
from po_batch.data.markers import is_done, mark_failed, scan, write_marker
from po_batch.data.plan import Plan
from po_batch.data.planfile import EpochWatch
from po_batch.data.schema import cast_to
from po_batch.data.store import Fenced, Store

ORPHAN_AGE_S = 3600.0


class LostUnit(Exception):
    """This worker may no longer commit the unit: reason 'claim' (another worker took the claim over) or 'epoch'
    (the plan was replaced, by --restart or a changed config)."""

    def __init__(self, unit_id: str, reason: str):
        why = {"claim": "its claim was taken over by another worker",
               "epoch": "the output's plan was replaced (--restart or a changed config) by another run"}[reason]
        super().__init__(f"unit {unit_id} was not committed: {why}")
        self.unit_id, self.reason = unit_id, reason


class Sink:
    """Commits the units of one plan epoch; with claims, only units this worker still holds."""

    def __init__(self, store: Store, plan: Plan, claims: Claims | None = None):
        self.store, self.epoch, self.schema, self.claims = store, plan.epoch, plan.schema, claims
        self.watch = EpochWatch(store, plan.epoch)

    def _check(self, unit_id: str) -> None:
        if not self.watch.current():
            raise LostUnit(unit_id, "epoch")
        if self.claims is not None and not self.claims.holds(unit_id):
            raise LostUnit(unit_id, "claim")

    def commit(self, unit_id: str, table: pa.Table, stats: dict) -> None:
        """Write the unit's part durably, then its done marker holding stats (see markers.write_marker); raises
        LostUnit, having committed nothing, if the unit is no longer this worker's."""
        if self.schema is not None:
            table = cast_to(table, self.schema)
        with self.store.open_writer(part_name(unit_id)) as w:
            pq.write_table(table, w.file)
            try:
                w.commit(lambda: self._check(unit_id))
            except Fenced:
                self._check(unit_id)  # the usual reason: the unit is no longer this worker's (LostUnit)
                raise
        # Stopped after the publish, this worker may have lost the unit meanwhile; then its marker must not be
        # written. Its part is not deleted, which could delete the new owner's: a --restart's wipe removed it or
        # the new epoch's commit of the unit replaces it; a claim taken over in the same epoch has the same rows.
        self._check(unit_id)
        try:
            write_marker(self.store, unit_id, self.epoch, stats)
        except OSError:
            # a full disk: the part is whole but not committed, and readers of OUT must not see it -- unless the
            # marker failed because a --restart wiped it half-written (Fenced), when the part may be the new run's
            self._check(unit_id)
            self.store.delete(part_name(unit_id))
            raise

    def mark_failed(self, unit_id: str, reason: str, owner: str) -> None:
        """Record that the unit could not be done (e.g. parquet.UnitReadError); status shows the reason, a later
        run retries the unit, and its commit removes the record."""
        mark_failed(self.store, unit_id, self.epoch, reason, owner)

    def is_done(self, unit_id: str) -> bool:
        return is_done(self.store, unit_id, self.epoch)

    def done(self) -> set[str]:
        """The units done in this epoch, from the done index (cheap at any size)."""
        return scan(self.store, self.epoch).done


def clean_orphans(store: Store) -> None:
    """Remove temporaries that crashed writers and claim takeovers left more than an hour ago.

    Parts without a marker stay: their data is whole (the commit is atomic), the unit's rerun replaces them,
    and deleting one could race a writer suspended between publishing it and its marker (Slurm suspends jobs
    with SIGSTOP), leaving a marker with no part.
    """
    cutoff = time.time() - ORPHAN_AGE_S
    for folder in ("", STATE_DIR, DONE_DIR, CLAIMS_DIR, FAILED_DIR):
        store.sweep(folder, cutoff)
