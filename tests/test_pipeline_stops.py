"""How `po-batch run` ends when something other than a row goes wrong, in real subprocesses: an unreadable unit
fails alone, a full disk stops the run at its first failed commit, a signal during the model's load stops it before
it claims, other workers holding units give exit 4, and a stalled run stops heartbeating its claims."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import tmpfs
from test_pipeline import (
    assert_each_input_row_once,
    build_corpus,
    claim_files,
    corpus,  # noqa: F401 (a fixture: the module's corpus, built as test_pipeline builds its own)
    finish,
    kill_group,
    markers,
    parts,
    plan_units,
    run,
    start,
    summary,
    wait_for,
    write_config,
)

from po_batch.data.plan import Unit
from po_batch.data.readers.base import UnitReadError
from po_batch.data.readers.parquet import read_unit

pytestmark = pytest.mark.slow


def corrupt_a_page(path) -> bytes:
    """Flip bytes in the middle of the first row group's image column, footer intact; returns the original."""
    original = path.read_bytes()
    meta = pq.read_metadata(path)
    col = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
               if meta.row_group(0).column(i).path_in_schema == "image")
    data = bytearray(original)
    middle = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return original


def test_an_unreadable_unit_fails_alone_and_a_later_run_retries_it(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [data], out)
    target = data / "b.parquet"
    st = target.stat()
    original = corrupt_a_page(target)
    with pytest.raises(UnitReadError):  # the corruption is real: the unit's rows cannot be read
        list(read_unit(Unit("u", str(target), 0, 16), ["id", "image"]))
    code, err = run(cfg)
    assert code == 1, err
    failed = json.loads(subprocess.run([sys.executable, "-m", "po_batch.cli", "status", str(cfg), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    units = plan_units(out)
    assert failed["units_failed"] == 1 and "cannot read unit" in err and "a later run retries this one" in err
    assert len(markers(out)) == len(units) - 1 and parts(out) == set(markers(out))  # every other unit committed
    assert claim_files(out) == []

    code, err = run(cfg)  # retried, and fails again while the file is still broken
    assert code == 1 and "cannot read unit" in err, err
    target.write_bytes(original)  # the flaky disk came back: the same bytes, the same time stamp
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, err = run(cfg)
    assert code == 0, err
    assert_each_input_row_once(out, rows)
    status = json.loads(subprocess.run([sys.executable, "-m", "po_batch.cli", "status", str(out), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert status["units_failed"] == 0 and status["units_done"] == len(units)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 96 KiB tmpfs: room for the plan and a few parts (4 KiB blocks each), not for all; root only."""
    with tmpfs(tmp_path / "mnt", "96k") as mnt:
        yield mnt


def test_a_full_disk_stops_the_run_at_its_first_failed_commit(corpus, tiny_qwen3_vl, tmp_path, small_tmpfs):
    root, rows = corpus
    out = small_tmpfs / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    code, err = run(cfg)
    assert code == 1 and "No space left on device" in err, err
    units = plan_units(out)
    done = markers(out)
    scored, _ = summary(err)
    assert 0 < len(done) < len(units) - 2 and scored < len(rows) / 2, "the run went on after a commit had failed"
    assert parts(out) == set(done) and claim_files(out) == []
    assert not any(f.name.startswith(".part-") for f in out.iterdir()), "a temporary part was left behind"


def test_sigterm_while_the_model_loads_stops_before_claiming_with_exit_3(corpus, tiny_qwen3_vl, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out)
    p = start(cfg)
    try:
        # the start line is printed right before the weights load
        buf = ""
        while "run " not in buf:
            line = p.stderr.readline()
            assert line, f"the run exited before its start line: {buf}"
            buf += line
        p.send_signal(signal.SIGTERM)
        code, err = finish(p)
    finally:
        kill_group(p)
    assert code == 3, buf + err
    assert markers(out) == {} and claim_files(out) == []


def test_units_held_by_another_live_worker_give_exit_4(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out)
    code, err = run(cfg, "--shard", "0/2")  # plan the output, do half of it
    assert code == 0, err
    left = sorted(set(plan_units(out)) - set(markers(out)))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a live worker's process
    try:
        epoch = json.loads((out / "_po_batch" / "plan.json").read_text())["epoch"]
        owner = owner_of(other.pid)
        (out / "_po_batch" / "claims").mkdir(exist_ok=True)
        for uid in left[:2]:
            (out / "_po_batch" / "claims" / f"{uid}.claim").write_text(json.dumps({"owner": owner, "epoch": epoch}))
        code, err = run(cfg)
        assert code == 4, err
        assert "2 units left to the other workers" in err
        assert set(plan_units(out)) - set(markers(out)) == set(left[:2])
    finally:
        other.kill()
        other.wait()
    code, err = run(cfg)  # the other worker died: its claims are taken over at once
    assert code == 0, err
    assert_each_input_row_once(out, rows)


def owner_of(pid: int) -> str:
    """A claim owner for process `pid` of this host, in the format the worker writes (data/claims.py)."""
    from po_batch.data import claims

    me = claims.default_owner()
    return me.replace(f":{os.getpid()}:", f":{pid}:", 1)


def test_a_stalled_run_stops_heartbeating_so_its_claims_expire(corpus, tiny_qwen3_vl, tmp_path):
    """A read that never returns (in-process prep, so no row timeout applies) must not keep the claims alive."""
    import pyarrow as pa

    root, _ = corpus
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never says a word
    data = tmp_path / "data"
    data.mkdir()
    png = (root / "data" / "sub" / "imgs" / "c-000.png").read_bytes()
    pq.write_table(pa.table({"id": ["good", "hangs"], "category": ["cat", "dog"],
                             "image": ["ok.png", f"ftp://127.0.0.1:{silent.getsockname()[1]}/x.png"]}),
                   data / "d.parquet")
    (data / "ok.png").write_bytes(png)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [data], out, claim_ttl_s=4)
    p = start(cfg)
    try:
        claim = out / "_po_batch" / "claims"
        wait_for(lambda: claim_files(out), p, "a claim")
        path = claim / claim_files(out)[0]
        time.sleep(6)  # stall_s is ttl / 2 = 2 s; the heartbeat runs every second while alive
        age = time.time() - path.stat().st_mtime
        assert p.poll() is None and age > 3, f"the stalled run still heartbeats its claim (age {age:.1f} s)"
    finally:
        kill_group(p)
        silent.close()
