"""Object storage end to end, against a real S3-compatible server on loopback (moto's server mode, in a process of
its own) through s3fs: the store's conditional writes, claims whose heartbeat beats a takeover, the plan lock, and
`po-batch run` with inputs and output on S3 -- SIGKILLed and resumed, two workers at once, a reader watching."""

import io
import json
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from s3server import start_server
from test_data_sink import StoppedAt, _stats, _table, committed, stopped_commit_leaves_the_new_part
from test_pipeline import TIMEOUT_S, build_corpus, finish, kill_group, picture, proc_file, start, summary
from test_wds import build_shards, member_json, write_shard

from po_batch.data.claims import Claims
from po_batch.data.layout import part_name
from po_batch.data.plan import load_or_create_plan
from po_batch.data.sink import Sink
from po_batch.data.errors import PlanError
from po_batch.data.objstore import FsspecStore
from po_batch.data.plan import plan_from_doc, read_plan_doc
from po_batch.data.store import open_store


@pytest.fixture(scope="module")
def s3():
    server = start_server()
    import s3fs

    try:
        yield s3fs.S3FileSystem(use_listings_cache=False)
    finally:
        server.stop()


@pytest.fixture
def bucket(s3):
    name = f"po-batch-{uuid.uuid4().hex[:12]}"
    s3.mkdir(name)
    return name


def upload(s3, local: Path, url: str) -> None:
    for f in local.rglob("*"):
        if f.is_file():
            s3.pipe_file(f"{url}/{f.relative_to(local)}", f.read_bytes())


# --- the store ----------------------------------------------------------------------------------------

def test_conditional_writes_on_the_server_are_what_the_store_builds_on(s3, bucket):
    """The probe of what moto's server really does: If-None-Match: * on PutObject refuses an existing key, If-Match
    refuses a stale ETag (and a missing key), and an ETag is the hash of the bytes -- rewriting an object unchanged
    keeps it, which is why a claim's heartbeat puts its lease time inside."""
    store = open_store(f"s3://{bucket}/out")
    assert isinstance(store, FsspecStore) and store.conditional and store.lease_in_object
    assert store.create("a/x", b"1") and not store.create("a/x", b"2") and store.read("a/x") == b"1"
    v1 = store.stat("a/x").version
    assert not store.replace_if("a/x", '"0123456789abcdef0123456789abcdef"', b"3")
    assert store.replace_if("a/x", v1, b"3") and store.read("a/x") == b"3"
    assert not store.replace_if("a/x", v1, b"4") and not store.replace_if("a/none", v1, b"4")
    v3 = store.stat("a/x").version
    assert store.touch("a/x") and store.stat("a/x").version == v3  # touched, same bytes: same ETag
    assert store.names("") == ["a"] and [e.name for e in store.list("a")] == ["x"] and store.names("none") == []
    assert store.delete("a") and not store.delete("a") and store.stat("a/x") is None


def test_appends_of_several_processes_read_back_as_one_object(s3, bucket):
    stores = [open_store(f"s3://{bucket}/out") for _ in range(3)]
    for i in range(4):
        for k, store in enumerate(stores):
            store.append("_po_batch/done.idx", f"{k}:{i}\n".encode())
    lines = stores[0].read("_po_batch/done.idx").decode().splitlines()
    assert sorted(lines) == sorted(f"{k}:{i}" for k in range(3) for i in range(4))
    assert stores[0].names("_po_batch") == ["done.idx.segments"]
    assert len(stores[0].names("_po_batch/done.idx.segments")) == 3
    with pytest.raises(FileNotFoundError):
        stores[0].read("_po_batch/other")


def test_a_claims_heartbeat_makes_a_takeover_decided_before_it_fail(s3, bucket):
    store = open_store(f"s3://{bucket}/out")
    # S3 keeps LastModified to the second: a ttl of 2 s is between 1 and 3 s of age
    a, b = Claims(store, "host:1:a:b:c", "E", ttl_s=2.0), Claims(store, "host:2:a:b:c", "E", ttl_s=2.0)
    assert a.try_claim("u") and not b.try_claim("u") and a.holds("u")
    time.sleep(3.2)  # A stalled past the ttl: B sees the claim expired ...
    entry = store.stat("_po_batch/claims/u.claim")
    a.heartbeat()  # ... but A beats before B's takeover lands
    assert store.stat("_po_batch/claims/u.claim").version != entry.version
    assert not store.replace_if("_po_batch/claims/u.claim", entry.version, b'{"owner":"B"}')
    assert a.holds("u") and not b.holds("u")
    time.sleep(3.2)
    assert b.try_claim("u") and b.holds("u") and not a.holds("u")  # expired for real: taken over
    a.heartbeat()  # A's beat no longer lands: it is not A's claim
    assert b.holds("u")
    a.release("u")
    assert b.holds("u")


def test_the_plan_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(s3, bucket, monkeypatch):
    store = open_store(f"s3://{bucket}/out")
    inside, order = threading.Lock(), []

    def hold(k):
        with FsspecStore(f"s3://{bucket}/out").lock("_po_batch/plan.lock"):
            assert inside.acquire(blocking=False), "two holders at once"
            order.append(k)
            time.sleep(0.3)
            inside.release()

    threads = [threading.Thread(target=hold, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order) == [0, 1, 2] and store.stat("_po_batch/plan.lock") is None

    import po_batch.data.objstore as objstore

    store.put("_po_batch/plan.lock", json.dumps({"owner": "a killed run", "lease": 0}).encode())
    monkeypatch.setattr(objstore, "LOCK_TTL_S", 1.0)
    t = time.monotonic()
    with store.lock("_po_batch/plan.lock"):
        assert json.loads(store.read("_po_batch/plan.lock"))["owner"] != "a killed run"
    # taken over once its lease is LOCK_TTL_S old by the object's LastModified, which S3 keeps to the second (so
    # the wait can be anything from 0 to about 2 s here), never waited on forever
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("where", ["after-check", "after-publish"])
def test_a_worker_stopped_in_its_commit_while_a_restart_redid_the_unit_leaves_the_new_part(s3, bucket, tmp_path,
                                                                                           where):
    """The S3 fence: the part's PUT is conditional on what the worker saw before its check, so one stopped between
    the check and the PUT cannot replace the restarted run's part (a PUT there overwrites)."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "in" / "a.parquet")
    store = open_store(f"s3://{bucket}/out")
    plan = load_or_create_plan(store, [str(tmp_path / "in")], 10, {})
    stopped_commit_leaves_the_new_part(store, plan, [str(tmp_path / "in")], where)


def test_a_commit_beaten_to_the_part_by_a_stale_writer_tries_again_and_replaces_it(s3, bucket, tmp_path):
    """A stale writer's PUT landing between this worker's look and its own makes the conditional PUT fail; the
    check still says the unit is this worker's, so it looks again and replaces the stale part."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "in" / "a.parquet")
    store = open_store(f"s3://{bucket}/out")
    plan = load_or_create_plan(store, [str(tmp_path / "in")], 10, {})
    sink = Sink(store, plan)
    stale = io.BytesIO()
    pq.write_table(_table([7]), stale)
    stopped = StoppedAt(sink, "after-check", lambda: store.put(part_name("u1"), stale.getvalue()))
    sink.commit("u1", _table([1, 2]), _stats(2))
    assert committed(store, "u1") == ([1, 2], plan.epoch) and stopped.calls == 3 and sink.is_done("u1")


def test_a_store_without_conditional_writes_refuses_claims_and_names_shard(tmp_path):
    store = open_store(f"memory://po-batch-{uuid.uuid4().hex[:8]}/out")
    assert not store.conditional
    with store.lock("_po_batch/plan.lock"):  # none to take: the README says to plan with one worker first
        store.put("_po_batch/plan.json", b"{}")
    assert store.read("_po_batch/plan.json") == b"{}" and store.stat("_po_batch/plan.json").version
    with pytest.raises(PlanError, match=r"memory://.*/out: this store has no exclusive create, which claims need; "
                                        r"run the workers with --shard I/N"):
        Claims(store, "w", "E")


def test_an_unknown_bucket_is_a_one_line_error(s3):
    store = open_store(f"s3://po-batch-no-such-bucket-{uuid.uuid4().hex[:8]}/out")
    with pytest.raises(PlanError, match=r"^output s3://po-batch-no-such-bucket-\w+/out is not writable"):
        with store.lock("_po_batch/plan.lock"):
            pass


# --- runs -----------------------------------------------------------------------------------------------

def write_config(path: Path, model: Path, inputs: list[str], out: str, doc: dict, **run) -> Path:
    doc = {"model": {"path": str(model), "dtype": "float32", "device": "cpu"}, "input": {"paths": inputs},
           "output": {"path": out},
           "run": {"batch_tokens": 2048, "workers": 0, "rows_per_unit": 16, "log_every_s": 1} | run} | doc
    path.write_text(json.dumps(doc, indent=2))
    return path


def s3_markers(s3, out: str) -> dict[str, dict]:
    try:
        names = s3.ls(f"{out}/_po_batch/done", detail=False)
    except FileNotFoundError:
        return {}
    return {n.rsplit("/", 1)[-1][:-5]: json.loads(s3.cat_file(n)) for n in names if n.endswith(".json")}


def s3_parts(s3, out: str) -> set[str]:
    return {n.rsplit("/", 1)[-1][5:-8] for n in s3.ls(out, detail=False) if n.rsplit("/", 1)[-1].startswith("part-")}


def s3_claims(s3, out: str) -> list[str]:
    try:
        return s3.ls(f"{out}/_po_batch/claims", detail=False)
    except FileNotFoundError:
        return []


def s3_units(out: str) -> dict[str, int]:
    return {u.id: u.rows for u in plan_from_doc(read_plan_doc(open_store(f"s3://{out}"))).units}


def s3_table(s3, out: str):
    return ds.dataset(out, filesystem=s3, format="parquet").to_table()


class S3Reader(threading.Thread):
    """Reads the output prefix as a dataset over and over during the runs, as a user's notebook would, and records
    anything but whole parts with each id once."""

    def __init__(self, s3, out: str, id_column: str):
        super().__init__(daemon=True)
        self.s3, self.out, self.id_column = s3, out, id_column
        self.stop = threading.Event()
        self.reads, self.errors, self.unit_rows = 0, [], None

    def run(self):
        while not self.stop.is_set():
            try:
                if self.unit_rows is None and self.s3.exists(f"{self.out}/_po_batch/plan.json"):
                    self.unit_rows = s3_units(self.out)
                if self.unit_rows is not None and s3_parts(self.s3, self.out):
                    dataset = ds.dataset(self.out, filesystem=self.s3, format="parquet")
                    table = dataset.to_table()
                    want = sum(self.unit_rows[f.rsplit("/", 1)[-1][5:-8]] for f in dataset.files)
                    ids = table.column(self.id_column).to_pylist()
                    self.reads += 1
                    if len(ids) != want or len(set(ids)) != len(ids):
                        self.errors.append(f"{len(ids)} rows ({len(set(ids))} ids) from whole parts of {want}")
            except FileNotFoundError:
                pass  # a part replaced or deleted between listing and reading: S3 lists what a GET may miss
            except Exception as e:  # noqa: BLE001 - any other failure to read is what this thread is for
                self.errors.append(repr(e))
            time.sleep(0.05)


@pytest.mark.slow
def test_parquet_on_s3_resumed_after_sigkill_writes_each_row_once_and_a_reader_sees_only_whole_parts(
        s3, bucket, tiny_qwen3_vl, tmp_path, po_batch_cli):
    rows = build_corpus(tmp_path / "corpus")
    upload(s3, tmp_path / "corpus" / "data", f"{bucket}/in")
    out = f"{bucket}/out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [f"s3://{bucket}/in"], f"s3://{out}",
                       {"input": {"paths": [f"s3://{bucket}/in"], "columns": ["category"]},
                        "task": {"prompt": "Is there a {category}? Answer yes or no."}}, workers=1)
    reader = S3Reader(s3, out, "id")
    reader.start()
    try:
        for kill in range(2):
            before = len(s3_markers(s3, out))
            p = start(cfg)
            try:
                deadline = time.time() + TIMEOUT_S
                while len(s3_markers(s3, out)) <= before:
                    assert p.poll() is None, f"the run exited before kill {kill}: {p.stderr.read()}"
                    assert time.time() < deadline
                    time.sleep(0.05)
                p.send_signal(signal.SIGKILL)
                p.wait(TIMEOUT_S)
            finally:
                kill_group(p)
            assert len(s3_markers(s3, out)) < len(s3_units(out))
        assert s3_claims(s3, out), "the killed runs left no claims"  # a dead pid's claims: taken over at once
        code, err = finish(start(cfg))
        assert code == 0, err
    finally:
        reader.stop.set()
        reader.join()
    assert reader.errors == [] and reader.reads > 0
    units = s3_units(out)
    assert set(s3_markers(s3, out)) == set(units) == s3_parts(s3, out) and s3_claims(s3, out) == []
    table = s3_table(s3, out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(rows)
    got = {r["id"]: r["error"] for r in table.to_pylist()}
    assert {k: e and e.split(":")[0] for k, e in got.items()} == {k: w["kind"] for k, w in rows.items()}
    assert f"s3://{bucket}/in/sub/imgs/nope.jpg" in got["c-009"]  # a relative path resolved against the S3 file
    st = json.loads(po_batch_cli("status", f"s3://{out}", "--json", timeout=60).stdout)
    assert (st["state"], st["rows_done"], st["units_done"]) == ("done", len(rows), len(units))


@pytest.mark.slow
def test_webdataset_on_s3_shared_by_two_concurrent_workers_scores_each_key_once(s3, bucket, tiny_qwen3_vl, tmp_path):
    want = build_shards(tmp_path)
    # plain shards, so that two workers have units to share: enough that the one that takes the plan lock second
    # (a lock poll, the plan's read and the model's load behind) still finds units left to claim
    for i in range(24):
        members = []
        for j in range(6):
            key = f"{10 + i:05d}{j:04d}"
            members += [(f"{key}.jpg", picture(random.Random(i * 10 + j), "JPEG")),
                        (f"{key}.json", member_json(caption="a dog"))]
            want[key] = {"kind": None}
        write_shard(tmp_path / "data" / f"{10 + i:05d}.tar", members)
    upload(s3, tmp_path / "data", f"{bucket}/shards")
    out = f"{bucket}/out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [f"s3://{bucket}/shards/*.tar"], f"s3://{out}",
                       {"input": {"paths": [f"s3://{bucket}/shards/*.tar"], "columns": ["caption", "txt"]},
                        "task": {"prompt": "Does this image show {caption}? Answer yes or no."}})
    # hold the plan lock until both have started, so that they really score at the same time
    lock = f"{out}/_po_batch/plan.lock"
    s3.pipe_file(lock, json.dumps({"owner": "the test", "lease": time.time()}).encode())
    procs = [start(cfg, threads=1), start(cfg, threads=1)]
    try:
        wait_idle(procs)  # both imported, resolved the model and now wait for the lock
        for p in procs:
            assert p.poll() is None, p.stderr.read()
        s3.rm_file(lock)
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    assert sorted(code for code, _ in results) in ([0, 0], [0, 4]), results
    units = s3_units(out)
    done = s3_markers(s3, out)
    assert set(done) == set(units) == s3_parts(s3, out) and s3_claims(s3, out) == []
    owners = {int(m["owner"].split(":")[1]) for m in done.values()}
    assert owners == {p.pid for p in procs}, "both runs should have committed units"
    scored = [summary(err) for _, err in results]
    assert sum(r for r, _ in scored) == len(want) and sum(u for _, u in scored) == len(units)
    table = s3_table(s3, out)
    got = {r["__key__"]: r["error"] for r in table.to_pylist()}
    assert table.num_rows == len(got) and sorted(got) == sorted(want)
    assert {k: e and e.split(":")[0] for k, e in got.items()} == {k: w["kind"] for k, w in want.items()}
    assert any("truncated" in m.get("notes", {}) for m in done.values())


def wait_idle(procs, timeout: float = TIMEOUT_S) -> None:
    """Until each process has done its start-up work (a few CPU seconds) and then spent a second all but idle: a
    worker polling the plan lock, on a machine loaded or not (a fixed sleep raced slow starts)."""
    def cpu(p) -> float:
        fields = proc_file(p.pid, "stat").rsplit(b")", 1)[-1].split()
        return (int(fields[11]) + int(fields[12])) / 100 if len(fields) > 12 else 0.0

    deadline = time.time() + timeout
    while time.time() < deadline:
        before = [cpu(p) for p in procs]
        time.sleep(1.0)
        after = [cpu(p) for p in procs]
        if all(b > 3 and a - b < 0.15 for a, b in zip(after, before)):
            return
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
    raise AssertionError("the workers never reached the plan lock")

