"""The stored plan (_po_batch/plan.json) as status and the sink's epoch check read it: no pyarrow, no fsspec, so
that `po-batch status` answers at once."""

import json

from po_batch.data.errors import PlanError
from po_batch.data.layout import PLAN
from po_batch.data.store import Store

PLAN_VERSION = 2


def read_plan_doc(store: Store) -> dict | None:
    try:
        raw = store.read(PLAN)
    except FileNotFoundError:
        return None
    where = f"{store.root}/{PLAN}"
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PlanError(f"{where} is not valid JSON ({e}); rerun with --restart to start over") from e
    if doc.get("version") != PLAN_VERSION:
        raise PlanError(f"{where} has plan version {doc.get('version')}, this po-batch reads version "
                        f"{PLAN_VERSION}; rerun with --restart to start over")
    return doc


class EpochWatch:
    """Whether the output's plan is still the one of `epoch`: one stat per call; the plan is read again only when
    it changed (it grew, or it was replaced)."""

    def __init__(self, store: Store, epoch: str):
        self.store, self.epoch = store, epoch
        self._seen = None  # the plan's version when it was last read and found to be ours

    def current(self) -> bool:
        entry = self.store.stat(PLAN)
        if entry is None:
            return False
        if entry.version != self._seen:
            try:
                doc = read_plan_doc(self.store)
            except PlanError:
                return False
            if doc is None or doc["epoch"] != self.epoch:
                return False
            self._seen = entry.version
        return True
