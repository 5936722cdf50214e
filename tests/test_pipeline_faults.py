"""`po-batch run` against concurrent and suspended workers, changed inputs and setup mistakes, in real subprocesses:
a restart or a claim takeover never lets an old worker's rows in, and setup mistakes are one line, exit 2."""

import json
import os
import random
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_pipeline import (
    assert_each_input_row_once,
    build_corpus,
    claim_files,
    corpus,  # noqa: F401 (a fixture: the module's corpus, built as test_pipeline builds its own)
    finish,
    kill_group,
    markers,
    output,
    owner_pid,
    parts,
    picture,
    plan_units,
    run,
    start,
    wait_for,
    write_config,
    write_parquet,
)

pytestmark = pytest.mark.slow


def committed(out) -> dict[str, tuple[bytes, int]]:
    """unit -> (its marker's bytes, its part's mtime): what a later commit of the unit would change."""
    return {uid: ((out / "_po_batch" / "done" / f"{uid}.json").read_bytes(),
                  (out / f"part-{uid}.parquet").stat().st_mtime_ns) for uid in markers(out)}


def stop_mid_unit(p, out) -> set[str]:
    """Wait for a first commit and for a claim of p on a unit not done, then SIGSTOP p (and its prep workers);
    returns the units p had committed."""
    def mid_unit():
        done = set(markers(out))
        return done and any(owner_pid(json.loads((out / "_po_batch" / "claims" / c).read_text())) == p.pid
                            and c.removesuffix(".claim") not in done for c in claim_files(out))

    wait_for(mid_unit, p, "a unit committed and another claimed")
    os.killpg(p.pid, signal.SIGSTOP)
    return {uid for uid, m in markers(out).items() if owner_pid(m) == p.pid}


def test_restart_while_another_worker_is_suspended_keeps_its_old_config_out(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    old = write_config(tmp_path / "old.yaml", tiny_qwen3_vl, [root / "data"], out)
    new = write_config(tmp_path / "new.yaml", tiny_qwen3_vl, [root / "data"], out)
    doc = json.loads(new.read_text())
    doc["task"]["prompt"] = "Does this photo show a {category}? Say yes or no."
    new.write_text(json.dumps(doc))
    p = start(old, threads=1)
    try:
        stop_mid_unit(p, out)
        code, err = run(new, "--restart")
        assert code == 0, err
        want, before = output(out), committed(out)
        os.killpg(p.pid, signal.SIGCONT)
        code, err = finish(p)
    finally:
        kill_group(p)
    assert committed(out) == before, "the old worker committed into the restarted output"
    assert output(out).equals(want)
    assert code == 1, err  # it scored for a plan that is gone: nothing it did counts
    assert "the output's plan was replaced" in err
    epoch = json.loads((out / "_po_batch" / "plan.json").read_text())["epoch"]
    assert {m["epoch"] for m in markers(out).values()} == {epoch}
    assert set(markers(out)) == set(plan_units(out)) == parts(out) and claim_files(out) == []
    assert_each_input_row_once(out, rows)


def test_worker_suspended_past_its_claim_ttl_does_not_recommit_what_another_finished(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, claim_ttl_s=2)
    p = start(cfg, threads=1)
    try:
        own = stop_mid_unit(p, out)
        time.sleep(3)  # past the ttl: its claims expire (its pid lives: they are not taken over as dead)
        code, err = run(cfg)
        assert code == 0, err
        before = committed(out)
        os.killpg(p.pid, signal.SIGCONT)
        code, err = finish(p)
    finally:
        kill_group(p)
    assert committed(out) == before, "the suspended worker re-committed a unit that another worker finished"
    assert {uid for uid, m in markers(out).items() if owner_pid(m) == p.pid} == own
    assert set(before) == set(plan_units(out))
    assert code == 0, err
    assert "its claim was taken over by another worker" in err
    assert parts(out) == set(markers(out)) and claim_files(out) == []
    assert_each_input_row_once(out, rows)


def small_corpus(data, n=12, seed=3):
    rng = random.Random(seed)
    rows = [{"id": f"{data.name}-{i}", "image": picture(rng, "JPEG"), "category": "dog"} for i in range(n)]
    write_parquet(data / "a.parquet", rows)
    return rows


def test_config_error_found_while_planning_leaves_no_plan_that_refuses_the_fixed_config(tiny_qwen3_vl, tmp_path):
    small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [tmp_path / "data"], out)
    doc = json.loads(cfg.read_text())
    doc["input"]["columns"], doc["task"]["prompt"] = ["colour"], "Is it {colour}? Answer yes or no."
    cfg.write_text(json.dumps(doc))
    code, err = run(cfg)
    assert code == 2, err
    assert f"po-batch: column 'colour' not found in {tmp_path / 'data' / 'a.parquet'}" in err
    assert "Traceback" not in err
    doc["input"]["columns"], doc["task"]["prompt"] = ["category"], "Is it a {category}? Answer yes or no."
    cfg.write_text(json.dumps(doc))
    code, err = run(cfg)
    assert code == 0, err
    assert len(output(out)) == 12


def test_passthrough_column_null_in_one_file_and_string_in_another_reads_as_one_dataset(tiny_qwen3_vl, tmp_path):
    data = tmp_path / "data"
    small_corpus(data)
    rng = random.Random(4)
    pq.write_table(pa.table({"id": [f"b-{i}" for i in range(8)], "image": [picture(rng, "PNG") for _ in range(8)],
                             "category": pa.nulls(8)}), data / "b.parquet")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [data], out)
    code, err = run(cfg)
    assert code == 0, err
    table = ds.dataset(str(out), format="parquet").to_table()
    assert table.schema.field("category").type == pa.string() and len(table) == 20
    assert {pq.read_schema(f).field("category").type for f in out.glob("part-*.parquet")} == {pa.string()}


def test_input_grown_after_a_run_is_refused_naming_it(tiny_qwen3_vl, tmp_path):
    rows = small_corpus(tmp_path / "data")
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [tmp_path / "data"], tmp_path / "out")
    code, err = run(cfg)
    assert code == 0, err
    write_parquet(tmp_path / "data" / "a.parquet", rows + [dict(rows[0], id="data-12")])
    code, err = run(cfg)
    assert code == 2, err
    assert f"po-batch: input {tmp_path / 'data' / 'a.parquet'} changed after it was planned (size " in err
    assert "rows 12 -> 13" in err and "Traceback" not in err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to: a read-only tmpfs as root (who ignores permissions), else chmod 555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], check=True)
        yield d
        subprocess.run(["umount", "-l", str(d)], check=True)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


@pytest.mark.parametrize("case", ["output-is-a-file", "output-read-only", "s3-output", "s3-input", "no-match",
                                  "output-in-input"])
def test_setup_mistakes_exit_2_with_one_line(tiny_qwen3_vl, tmp_path, request, case):
    data = tmp_path / "data"
    small_corpus(data, n=2)
    inputs, out = [data], tmp_path / "out"
    if case == "output-is-a-file":
        out.write_text("not a directory")
        want = f"po-batch: output {out} is a file, not a directory"
    elif case == "output-read-only":
        out = request.getfixturevalue("read_only_dir")
        want = f"po-batch: output {out} is not writable ("
    elif case == "s3-output":
        out = "s3://bucket/scores"
        want = "po-batch: output s3://bucket/scores: the s3:// backend is not installed; pip install 'po-batch[s3]'"
    elif case == "s3-input":
        inputs = ["s3://bucket/data/*.parquet"]
        want = ("po-batch: input s3://bucket/data/*.parquet: the s3:// backend is not installed; "
                "pip install 'po-batch[s3]'")
    elif case == "no-match":
        inputs = [data / "*.parkay"]
        want = f"po-batch: input {data / '*.parkay'} matches no file"
    else:
        out = data / "scores"
        want = f"po-batch: output.path: {out} is in the input directory {data}"
    if case.startswith("s3") and _has_s3fs():
        pytest.skip("s3fs is installed here")
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, inputs, out)
    code, err = run(cfg)
    assert code == 2, err
    assert err.startswith(want) and err.count("\n") == 1, err


def _has_s3fs() -> bool:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True
