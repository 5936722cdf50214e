"""`po-batch run` end to end, in real subprocesses on real Parquet files and JPEG/PNG images: scores and row errors,
exactly-once output under SIGKILL, SIGTERM, concurrent workers and shards, and inputs added after a run."""

import collections
import fcntl
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from po_batch.config import load_config
from po_batch.spec import open_spec

pytestmark = pytest.mark.slow

PROMPT = "Is there a {category} in this image? Answer yes or no."
CATEGORIES = ["cat", "dog", "car", "tree"]
TIMEOUT_S = 180


# --- corpus --------------------------------------------------------------------------------------

def picture(rng: random.Random, fmt: str) -> bytes:
    w, h = rng.randint(30, 400), rng.randint(30, 400)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(w), rng.randrange(h)
        fill = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x, y, x + rng.randint(5, w), y + rng.randint(5, h)), fill=fill)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict], image_type=pa.binary()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [r["id"] for r in rows], "image": pa.array([r["image"] for r in rows], image_type),
                      "category": [r["category"] for r in rows]})
    pq.write_table(table, path, row_group_size=8)


def build_corpus(root: Path, seed: int = 0) -> dict[str, dict]:
    """Three Parquet files, 200 rows: two with image bytes, one with image paths relative to its folder.
    Returns id -> {"kind": expected error kind or None, "image": the bytes to score, "category": ...}."""
    rng = random.Random(seed)
    rows = {}

    def row(prefix: str, i: int, image, kind=None, data=None) -> dict:
        r = {"id": f"{prefix}-{i:03d}", "image": image, "category": rng.choice(CATEGORIES)}
        rows[r["id"]] = {"kind": kind, "image": image if data is None else data, "category": r["category"]}
        return r

    def good(i):
        return picture(rng, "PNG" if i % 3 == 0 else "JPEG")

    a = []
    for i in range(80):
        if i == 7:
            jpeg = picture(rng, "JPEG")
            a.append(row("a", i, jpeg[: len(jpeg) // 2], "truncated"))
        elif i == 23:
            a.append(row("a", i, b"", "empty"))
        elif i == 41:
            a.append(row("a", i, b"<html>this is not an image</html>", "not_image"))
        elif i == 60:
            png = picture(rng, "PNG")
            a.append(row("a", i, png[: len(png) // 2], "truncated"))
        else:
            a.append(row("a", i, good(i)))
    write_parquet(root / "data" / "a.parquet", a)

    b = [row("b", i, None, "missing") if i == 12 else row("b", i, b"", "empty") if i == 50 else row("b", i, good(i))
         for i in range(70)]
    write_parquet(root / "data" / "b.parquet", b)

    sub = root / "data" / "sub"
    (sub / "imgs").mkdir(parents=True)
    (sub / "imgs" / "notes.txt").write_text("not an image either")
    c = []
    for i in range(50):
        if i == 9:
            c.append(row("c", i, "imgs/nope.jpg", "missing"))
        elif i == 31:
            c.append(row("c", i, "imgs/notes.txt", "not_image"))
        else:
            data = good(i)
            name = f"imgs/c-{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
            (sub / name).write_bytes(data)
            c.append(row("c", i, name, data=data))
    write_parquet(sub / "c.parquet", c, pa.string())
    return rows


def write_config(path: Path, model: Path, inputs: list, out: Path, image: dict | None = None, **run) -> Path:
    doc = {"model": {"path": str(model), "dtype": "float32", "device": "cpu"},
           "input": {"paths": [str(p) for p in inputs], "columns": ["category"]},
           "task": {"prompt": PROMPT, "yes": "yes", "no": "no"},
           "output": {"path": str(out)},
           "run": {"batch_tokens": 2048, "workers": 0, "rows_per_unit": 16, "log_every_s": 1} | run}
    if image:
        doc["image"] = image
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return path


# --- processes and output ------------------------------------------------------------------------

def start(config: Path, *args, threads: int | None = None) -> subprocess.Popen:
    """`po-batch run CONFIG ARGS` in its own session, so that the test can clean up its prep workers too.
    threads: torch's threads, to keep runs side by side from crowding each other out of a small machine."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    return subprocess.Popen([sys.executable, "-m", "po_batch.cli", "run", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    return p.returncode, err


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run(config: Path, *args) -> tuple[int, str]:
    return finish(start(config, *args))


def markers(out: Path) -> dict[str, dict]:
    folder = out / "_po_batch" / "done"
    if not folder.is_dir():
        return {}
    found = {}
    for f in folder.iterdir():
        if f.suffix == ".json" and not f.name.startswith("."):
            found[f.stem] = json.loads(f.read_text())
    return found


def plan_units(out: Path) -> dict[str, int]:
    """unit id -> rows, from the output's plan."""
    from po_batch.data.plan import plan_from_doc, read_plan_doc
    from po_batch.data.store import LocalStore

    return {u.id: u.rows for u in plan_from_doc(read_plan_doc(LocalStore(out))).units}


def claim_files(out: Path) -> list[str]:
    folder = out / "_po_batch" / "claims"
    return sorted(f.name for f in folder.iterdir()) if folder.is_dir() else []


def parts(out: Path) -> set[str]:
    return {f.name.removeprefix("part-").removesuffix(".parquet") for f in out.glob("part-*.parquet")}


def output(out: Path) -> pa.Table:
    return ds.dataset(str(out), format="parquet").to_table().sort_by("id")


def summary(stderr: str) -> tuple[int, int]:
    """(rows, units) from the run's closing summary; rows count row errors too."""
    m = re.search(r"(\d+) units? committed, .*; (\d+) rows? scored, (\d+) row errors?", stderr)
    assert m, stderr
    return int(m[2]) + int(m[3]), int(m[1])


def owner_pid(marker: dict) -> int:
    return int(marker["owner"].split(":")[1])


def proc_file(pid: int, name: str) -> bytes:
    """/proc/<pid>/<name>, or b"" when the process (or thread) is gone: it can exit between listing and reading."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def children(pid: int) -> list[int]:
    """The live child processes of pid, found by each process's parent in /proc/<pid>/stat."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_file(int(entry.name), "stat")
            fields = stat[stat.rfind(b")") + 2:].split()  # past "pid (comm) ", whose comm may hold spaces
            if len(fields) > 1 and int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def wait_for(cond, p: subprocess.Popen, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"the run exited ({p.returncode}) before {what}: {p.stderr.read()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def assert_each_input_row_once(out: Path, corpus: dict) -> pa.Table:
    table = output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id appears twice"
    assert sorted(ids) == sorted(corpus)
    return table


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def clean_run(corpus, tiny_qwen3_vl, tmp_path_factory):
    """One uninterrupted run over the corpus: the reference the other runs must reproduce."""
    root, _ = corpus
    base = tmp_path_factory.mktemp("clean")
    cfg = write_config(base / "config.yaml", tiny_qwen3_vl, [root / "data"], base / "out", workers=1)
    code, err = run(cfg)
    assert code == 0, err
    return cfg, base / "out", err


# --- tests ---------------------------------------------------------------------------------------

def test_run_scores_good_rows_like_the_engine_and_records_bad_rows(corpus, clean_run):
    root, rows = corpus
    cfg, out, err = clean_run
    table = assert_each_input_row_once(out, rows)
    assert table.column_names == ["id", "category", "yes_logit", "no_logit", "p_yes", "error"]
    got = {r["id"]: r for r in table.to_pylist()}

    for rid, want in rows.items():
        r = got[rid]
        assert r["category"] == want["category"]
        if want["kind"]:
            assert r["error"] and r["error"].startswith(f"{want['kind']}: "), (rid, r["error"])
            assert r["yes_logit"] is None and r["no_logit"] is None and r["p_yes"] is None
        else:
            assert r["error"] is None, (rid, r["error"])
    # relative paths resolve against the Parquet file's folder, whatever the working directory
    assert str(root / "data" / "sub" / "imgs" / "nope.jpg") in got["c-009"]["error"]
    assert "no image" in got["b-012"]["error"]

    good = [rid for rid, want in rows.items() if not want["kind"]]
    spec = open_spec(load_config(cfg), "cpu", "float32", workers=0)
    samples = [spec.prep((rows[rid]["image"], {"id": rid, "category": rows[rid]["category"]})) for rid in good]
    ref = spec.load_engine().score(samples)[:, 0]
    yes = np.array([got[rid]["yes_logit"] for rid in good])
    no = np.array([got[rid]["no_logit"] for rid in good])
    np.testing.assert_allclose(yes, ref[:, 0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(no, ref[:, 1], rtol=0, atol=1e-5)
    p_yes = np.array([got[rid]["p_yes"] for rid in good])
    np.testing.assert_allclose(p_yes, 1 / (1 + np.exp(no - yes)), rtol=0, atol=1e-6)

    assert summary(err) == (len(rows), len(plan_units(out)))
    kinds = sum((collections.Counter(m["error_kinds"]) for m in markers(out).values()), collections.Counter())
    assert kinds == collections.Counter(want["kind"] for want in rows.values() if want["kind"])
    assert claim_files(out) == []


class DatasetReader(threading.Thread):
    """Opens pyarrow.dataset.dataset(out) over and over, as a user's notebook would during a run, and records
    anything that is not a set of whole units with each id once."""

    def __init__(self, out: Path, unit_rows: dict[str, int]):
        super().__init__(daemon=True)
        self.out, self.unit_rows = out, unit_rows
        self.stop = threading.Event()
        self.reads, self.nonempty, self.errors = 0, 0, []

    def run(self):
        while not self.stop.is_set():
            if self.out.is_dir():
                try:
                    dataset = ds.dataset(str(self.out), format="parquet")
                    table = dataset.to_table()
                    self.reads += 1
                    if dataset.files:
                        self.nonempty += 1
                        want = sum(self.unit_rows[Path(f).stem.removeprefix("part-")] for f in dataset.files)
                        ids = table.column("id").to_pylist()
                        if len(ids) != want or len(set(ids)) != len(ids):
                            self.errors.append(f"{len(ids)} rows ({len(set(ids))} ids) from whole parts of {want}")
                except Exception as e:  # noqa: BLE001 - any failure to read is what this thread is for
                    self.errors.append(repr(e))
            time.sleep(0.01)


def test_resume_after_sigkill_writes_each_row_once_with_identical_scores(corpus, clean_run, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    _, clean_out, _ = clean_run
    unit_rows = plan_units(clean_out)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, workers=1)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reader = DatasetReader(out, unit_rows)
    reader.start()
    killed = set()
    try:
        for kill in range(5):
            before = len(markers(out))
            if len(unit_rows) - before < 4:  # a kill must land before the run's end: leave it room for one
                break
            p = start(cfg)
            killed.add(p.pid)
            try:
                wait_for(lambda: len(markers(out)) > before, p, f"a unit committed (kill {kill}, seed {seed})")
                # a random moment mid-run, but never so late that the run ends first: at most 2 more units
                deadline = time.time() + rng.uniform(0, 1.5)
                while time.time() < deadline and len(markers(out)) < before + 2:
                    time.sleep(0.002)
                assert p.poll() is None, f"the run finished before kill {kill} (seed {seed})"
                p.send_signal(signal.SIGKILL)
                p.wait(TIMEOUT_S)
                assert p.returncode == -signal.SIGKILL
            finally:
                kill_group(p)
            assert len(markers(out)) < len(unit_rows)
        assert len(killed) >= 3, f"only {len(killed)} kills landed (seed {seed})"
        # Claims of the killed runs are left, seconds old (ttl is 300 s): that the next run still finishes every
        # unit shows it takes over a claim of a dead pid on this host at once.
        left = [json.loads((out / "_po_batch" / "claims" / name).read_text())["owner"] for name in claim_files(out)]
        assert left, "the killed runs left no claims: the kills did not land mid-unit"
        assert {int(owner.split(":")[1]) for owner in left} <= killed
        code, err = run(cfg)
        assert code == 0, err
    finally:
        reader.stop.set()
        reader.join()
    assert reader.errors == []
    assert reader.nonempty > 0
    assert set(markers(out)) == set(unit_rows) == parts(out)
    assert claim_files(out) == []
    assert_each_input_row_once(out, rows)
    resumed, clean = output(out), output(clean_out)
    for name in clean.column_names:  # exactly: a unit's scores must not depend on where a run was cut
        assert resumed.column(name).equals(clean.column(name)), f"{name} differs from an uninterrupted run's"


def hold_plan_lock(out: Path):
    state = out / "_po_batch"
    state.mkdir(parents=True)
    lock = open(state / "plan.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def blocked_on_lock(pids: list[int]) -> bool:
    waiting = {int(line.split()[5]) for line in Path("/proc/locks").read_text().splitlines() if " -> " in line}
    return set(pids) <= waiting


def test_two_concurrent_runs_share_the_units_and_commit_each_once(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out)
    # hold the plan lock until both have started up, so that they really score at the same time
    lock = hold_plan_lock(out)
    procs = [start(cfg, threads=1), start(cfg, threads=1)]
    try:
        wait_for(lambda: blocked_on_lock([p.pid for p in procs]), procs[0], "both runs waiting for the plan")
        lock.close()
        results = [finish(p) for p in procs]
    finally:
        lock.close()
        for p in procs:
            kill_group(p)
    # the first to finish may find the other's last unit still claimed: exit 4, done here, others hold the rest
    assert sorted(code for code, _ in results) in ([0, 0], [0, 4]), results
    units = plan_units(out)
    done = markers(out)
    assert set(done) == set(units) == parts(out)
    assert {owner_pid(m) for m in done.values()} == {p.pid for p in procs}, "both runs should have committed units"
    # each unit scored by one run only: the runs' own counts add up to the plan exactly
    scored = [summary(err) for _, err in results]
    assert sum(r for r, _ in scored) == len(rows)
    assert sum(u for _, u in scored) == len(units)
    assert_each_input_row_once(out, rows)
    assert claim_files(out) == []


def test_sigterm_commits_claimed_units_releases_claims_and_exits_3(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out)
    p = start(cfg)
    try:
        wait_for(lambda: markers(out), p, "a unit committed")
        p.send_signal(signal.SIGTERM)
        code, err = finish(p)
    finally:
        kill_group(p)
    assert code == 3, err
    assert "SIGTERM" in err
    units = plan_units(out)
    done = markers(out)
    assert 0 < len(done) < len(units)
    assert parts(out) == set(done), "a part without its marker, or a marker without its part"
    assert claim_files(out) == []
    for uid in done:
        assert pq.read_metadata(out / f"part-{uid}.parquet").num_rows == units[uid]

    code, err = run(cfg)
    assert code == 0, err
    assert summary(err) == (sum(units[u] for u in units if u not in done), len(units) - len(done))
    assert set(markers(out)) == set(units) == parts(out)
    assert_each_input_row_once(out, rows)


def assert_left_whole_and_resumes(cfg: Path, out: Path, rows: dict) -> None:
    """After a stopped run: no claims left, every part has its marker, and a rerun finishes the output."""
    assert claim_files(out) == []
    assert parts(out) == set(markers(out))
    code, err = run(cfg)
    assert code == 0, err
    assert_each_input_row_once(out, rows)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_whole_process_group_with_prep_workers_stops_cleanly(corpus, tiny_qwen3_vl, tmp_path, sig):
    """Ctrl-C and scancel reach the prep workers too: the run must still finish its claimed units and exit."""
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, workers=2)
    p = start(cfg)
    try:
        wait_for(lambda: markers(out), p, "a unit committed")
        os.killpg(p.pid, sig)
        code, err = finish(p, timeout=120)
    finally:
        kill_group(p)
    assert code in (0, 3), err  # 0 when every unit was already claimed when the signal came
    assert_left_whole_and_resumes(cfg, out, rows)


def prep_workers(p: subprocess.Popen) -> list[int]:
    """The run's spawned prep workers (not multiprocessing's resource tracker)."""
    return [k for k in children(p.pid) if b"spawn_main" in proc_file(k, "cmdline")]


def rss_mb(pid: int) -> float:
    line = next((x for x in proc_file(pid, "status").splitlines() if x.startswith(b"VmRSS:")), b"VmRSS: 0 kB")
    return int(line.split()[1]) / 1024


def test_a_prep_worker_killed_on_a_row_makes_that_row_crashed_and_the_run_goes_on(tiny_qwen3_vl, tmp_path):
    rng = random.Random(3)
    rows = [{"id": f"r-{i:02d}", "image": picture(rng, "JPEG"), "category": "dog"} for i in range(40)]
    # a big but legal image, whose decode and resize keep a worker busy (and big) for a few seconds
    y, x = np.mgrid[0:6000, 0:6000]
    big = io.BytesIO()
    Image.fromarray(np.dstack([x % 256, y % 256, (x + y) % 256]).astype(np.uint8)).save(big, "PNG", compress_level=1)
    rows[25]["image"] = big.getvalue()
    write_parquet(tmp_path / "data" / "x.parquet", rows)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [tmp_path / "data"], out, workers=2)
    p = start(cfg)
    busy = []

    def on_big_image() -> bool:  # its worker holds 144 MB of pixels more than the other
        rss = {w: rss_mb(w) for w in prep_workers(p)}
        busy[:] = [w for w, mb in rss.items() if len(rss) == 2 and mb > min(rss.values()) + 100]
        return bool(busy)

    try:
        wait_for(on_big_image, p, "a worker on the big image")
        os.kill(busy[0], signal.SIGKILL)  # as the OOM killer would
        code, err = finish(p, timeout=120)
    finally:
        kill_group(p)
    assert code == 0, err
    got = {r["id"]: r["error"] for r in output(out).to_pylist()}
    assert sorted(got) == [r["id"] for r in rows]
    assert got.pop("r-25").startswith("crashed: the prep worker died on this row")
    assert set(got.values()) == {None}, "a row other than the one in flight was lost"
    assert set(markers(out)) == set(plan_units(out)) == parts(out)
    assert busy[0] not in prep_workers(p)


def test_image_paths_that_are_no_regular_file_too_big_or_hang_are_row_errors(tiny_qwen3_vl, tmp_path):
    rng = random.Random(4)
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    os.mkfifo(data / "imgs" / "fifo.jpg")  # opening it would wait for a writer forever
    (data / "imgs" / "big.jpg").write_bytes(rng.randbytes(300_000))
    (data / "imgs" / "folder.jpg").mkdir()
    hang = socket.create_server(("127.0.0.1", 0))  # accepts connections (the kernel does) and never says a word
    hostile = {"fifo": ("imgs/fifo.jpg", "not_file"), "zero": ("/dev/zero", "not_file"),
               "urandom": ("/dev/urandom", "not_file"), "dir": ("imgs/folder.jpg", "not_file"),
               "big": ("imgs/big.jpg", "too_large"),
               "ftp": (f"ftp://127.0.0.1:{hang.getsockname()[1]}/img.jpg", "timeout")}
    rows, want = [], {}
    for i in range(24):
        name = f"imgs/{i}.jpg"
        (data / name).write_bytes(picture(rng, "JPEG"))
        rows.append({"id": f"p-{i:02d}", "image": name, "category": "car"})
        want[f"p-{i:02d}"] = None
    for k, (rid, (path, kind)) in enumerate(hostile.items()):
        rows.insert(3 * k + 1, {"id": rid, "image": path, "category": "car"})
        want[rid] = kind
    write_parquet(data / "paths.parquet", rows, pa.string())
    blobs = [{"id": f"b-{i}", "image": picture(rng, "PNG"), "category": "cat"} for i in range(6)]
    blobs[2]["image"] = rng.randbytes(300_000)
    want |= {r["id"]: None for r in blobs} | {"b-2": "too_large"}
    write_parquet(data / "bytes.parquet", blobs)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [data], out, image={"max_file_bytes": 200_000},
                       workers=2, row_timeout_s=3)
    try:
        t = time.monotonic()
        code, err = finish(start(cfg), timeout=120)
    finally:
        hang.close()
    assert code == 0, err
    assert time.monotonic() - t < 100
    got = {r["id"]: r["error"] for r in output(out).to_pylist()}
    assert {rid: e and e.split(":")[0] for rid, e in got.items()} == want, got
    assert "image.max_file_bytes" in got["big"] and "run.row_timeout_s" in got["ftp"]


def test_shards_together_cover_every_unit_once(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out)
    procs = [start(cfg, "--shard", "0/2", threads=1), start(cfg, "--shard", "1/2", threads=1)]
    try:
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    for code, err in results:
        assert code == 0, err
    units = list(plan_units(out))
    done = markers(out)
    assert set(done) == set(units) == parts(out)
    for k, uid in enumerate(units):
        assert owner_pid(done[uid]) == procs[k % 2].pid, f"unit {uid} was scored by the other shard"
    assert [summary(err)[1] for _, err in results] == [len(units[0::2]), len(units[1::2])]
    assert_each_input_row_once(out, rows)
    assert claim_files(out) == []


def test_input_added_after_a_finished_run_is_scored_alone_by_the_next(tiny_qwen3_vl, tmp_path):
    rng = random.Random(1)
    data = tmp_path / "data"
    for name, n in (("x", 30), ("y", 20)):
        write_parquet(data / f"{name}.parquet", [{"id": f"{name}-{i}", "image": picture(rng, "JPEG"),
                                                  "category": "dog"} for i in range(n)])
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [data / "*.parquet"], out)
    code, err = run(cfg)
    assert code == 0, err
    before = {f.name: f.stat().st_mtime_ns for f in [*out.glob("part-*"), *(out / "_po_batch" / "done").iterdir()]}
    old_units = set(markers(out))

    write_parquet(data / "z.parquet", [{"id": f"z-{i}", "image": picture(rng, "PNG"), "category": "cat"}
                                       for i in range(12)])
    code, err = run(cfg)
    assert code == 0, err
    assert summary(err) == (12, 1)
    after = {f.name: f.stat().st_mtime_ns for f in [*out.glob("part-*"), *(out / "_po_batch" / "done").iterdir()]}
    assert {k: after[k] for k in before} == before, "a finished unit was rewritten"
    new_units = set(markers(out)) - old_units
    assert new_units == {"f00002-r000000000"}
    assert set(markers(out)) == set(plan_units(out)) == parts(out)
    ids = output(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 62
    assert {i for i in ids if i.startswith("z-")} == {f"z-{i}" for i in range(12)}


def test_duplicate_id_in_a_unit_is_a_usage_error_naming_file_and_id(tiny_qwen3_vl, tmp_path):
    rng = random.Random(2)
    ids = [f"r-{i}" for i in range(20)]
    ids[14] = "r-11"
    bad = tmp_path / "data" / "dup.parquet"
    write_parquet(bad, [{"id": i, "image": picture(rng, "JPEG"), "category": "car"} for i in ids])
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [bad], tmp_path / "out", rows_per_unit=100)
    code, err = run(cfg)
    assert code == 2, err
    assert str(bad) in err and "'r-11'" in err, err
    assert "Traceback" not in err
    assert claim_files(tmp_path / "out") == []
