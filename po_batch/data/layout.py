"""Where each thing lives in an output directory, as store names. Data parts sit at the top, where
pyarrow.dataset finds them; everything else is under _po_batch/, which pyarrow.dataset skips."""

STATE_DIR = "_po_batch"
PLAN = f"{STATE_DIR}/plan.json"
LOCK = f"{STATE_DIR}/plan.lock"
CLAIMS_DIR = f"{STATE_DIR}/claims"
DONE_DIR = f"{STATE_DIR}/done"
FAILED_DIR = f"{STATE_DIR}/failed"
INDEX = f"{STATE_DIR}/done.idx"
WORKERS_DIR = f"{STATE_DIR}/workers"


def part_name(unit_id: str) -> str:
    return f"part-{unit_id}.parquet"


def marker_name(unit_id: str) -> str:
    return f"{DONE_DIR}/{unit_id}.json"


def failure_name(unit_id: str) -> str:
    return f"{FAILED_DIR}/{unit_id}.json"


def claim_name(unit_id: str) -> str:
    return f"{CLAIMS_DIR}/{unit_id}.claim"


def record_name(owner: str) -> str:
    """A worker's progress record, named by its host, pid and the random part of its claim owner."""
    host, pid, *_, nonce = owner.split(":")
    return f"{WORKERS_DIR}/{host}-{pid}-{nonce}.json"
