"""Several engine processes on one node (`po-batch run --gpus N`, CPU engines here), in real subprocesses: every unit
once with one summary for the node, an engine process killed mid-run reported and its units taken over, a --restart
with several engine processes while an older run is suspended, static shards split among them; run.gpus itself."""

from contextlib import contextmanager
import json
import os
import re
import signal

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
    plan_units,
    start,
    summary,
    wait_for,
    write_config,
)

from po_batch.config import ConfigError, config_from_dict, config_to_dict, engines_count

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean_run(corpus, tiny_qwen3_vl, tmp_path_factory):
    """One engine process, uninterrupted: the scores every other run must reproduce. On one thread, as each of two
    CPU engine processes on a two-core machine runs: more threads sum matmuls in another order (Δ ~1e-6)."""
    root, _ = corpus
    base = tmp_path_factory.mktemp("clean")
    cfg = write_config(base / "config.yaml", tiny_qwen3_vl, [root / "data"], base / "out", rows_per_unit=8)
    code, err = finish(start(cfg, threads=1))
    assert code == 0, err
    return output(base / "out")


def records(out) -> list[dict]:
    folder = out / "_po_batch" / "workers"
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def held_claims(out, engine: int) -> tuple[int | None, list[str]]:
    """The pid of the engine process `engine` (once its record exists) and the units it holds claims on."""
    rec = next((r for r in records(out) if r["engine"] == engine), None)
    if rec is None:
        return None, []
    held = []
    for name in claim_files(out):
        try:
            doc = json.loads((out / "_po_batch" / "claims" / name).read_text())
        except (FileNotFoundError, ValueError):
            continue
        if owner_pid(doc) == rec["pid"]:
            held.append(name.removesuffix(".claim"))
    return rec["pid"], held


@contextmanager
def engine_0_stopped(out, p):
    """Engine 0 stopped (SIGSTOP) from its start (its record, written before its model loads) until the block ends:
    on a slow machine it scored every unit before another engine process had loaded its model (it did, once, in
    CI). Its record is written after the plan's lock is released, so it holds no lock the others wait for."""
    wait_for(lambda: held_claims(out, 0)[0] is not None, p, "engine 0 starting")
    pid = held_claims(out, 0)[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def assert_scores_equal(out, clean) -> None:
    got = output(out)
    for name in clean.column_names:
        assert got.column(name).equals(clean.column(name)), f"{name} differs from one engine process's run"


@pytest.mark.parametrize("n", [2, 3])
def test_several_engine_processes_score_every_unit_once_with_one_summary(corpus, clean_run, tiny_qwen3_vl,
                                                                         tmp_path, n):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    p = start(cfg, "--gpus", str(n), threads=1)
    with engine_0_stopped(out, p):  # the engine processes load their models from the same start
        wait_for(lambda: held_claims(out, n - 1)[0] is not None, p, f"engine {n - 1} starting")
    code, err = finish(p)
    assert code == 0, err
    assert_each_input_row_once(out, rows)
    assert_scores_equal(out, clean_run)
    units = plan_units(out)
    assert set(markers(out)) == set(units) == parts(out) and claim_files(out) == []
    assert len(re.findall(r"po-batch: run done: ", err)) == 1, err  # one summary for the node ...
    assert summary(err) == (len(rows), len(units))  # ... that counts every engine process's rows and units
    assert f"to do, {n} engine processes on cpu (float32), prep in each engine process" in err
    # the engine processes are the launcher's children, each with its record; together they scored every row
    recs = records(out)
    assert sorted(r["engine"] for r in recs) == list(range(n)) and {r["state"] for r in recs} == {"done"}
    pids = {r["pid"] for r in recs}
    assert p.pid not in pids and {owner_pid(m) for m in markers(out).values()} <= pids
    assert len({owner_pid(m) for m in markers(out).values()}) >= 2, "one engine process did all the work"
    assert sum(r["rows"] for r in recs) == len(rows)
    per_engine = re.search(r"  per engine     (.*)", err)[1]
    assert per_engine == ", ".join(f"engine {r['engine']}: {r['rows']} rows"
                                   for r in sorted(recs, key=lambda r: r["engine"]))


def test_a_killed_engine_process_is_reported_and_the_others_take_over_its_units(corpus, clean_run, tiny_qwen3_vl,
                                                                                tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    p = start(cfg, "--gpus", "2", threads=1)
    victim = {}

    def engine_1_holds_a_claim() -> bool:
        pid, held = held_claims(out, 1)
        victim.update(pid=pid, held=held)
        return bool(held) and len(markers(out)) < len(plan_units(out)) - 4

    try:
        with engine_0_stopped(out, p):
            wait_for(engine_1_holds_a_claim, p, "engine 1 holding a claim")
            os.kill(victim["pid"], signal.SIGKILL)  # as the OOM killer would
        code, err = finish(p)
    finally:
        kill_group(p)
    assert code == 1, err  # the node says an engine process failed ...
    assert re.search(rf"po-batch: engine process engine 1 \(pid {victim['pid']}\) was killed by signal 9 \(exit code "
                     rf"-9\); its \d+ claimed units? \(.*{victim['held'][0]}.*\) go to the other engine processes",
                     err), err
    # ... yet every row is there once: the other one took over the units it held
    assert_each_input_row_once(out, rows)
    assert_scores_equal(out, clean_run)
    done = markers(out)
    assert set(done) == set(plan_units(out)) == parts(out) and claim_files(out) == []
    assert owner_pid(done[victim["held"][0]]) != victim["pid"]
    died = next(r for r in records(out) if r["pid"] == victim["pid"])
    assert (died["state"], died["exit_code"]) == ("died", -9)
    assert not (out / "_po_batch" / "failed").is_dir() or not list((out / "_po_batch" / "failed").iterdir())


def test_restart_with_several_engine_processes_while_an_older_run_is_suspended(corpus, tiny_qwen3_vl, tmp_path):
    """The launcher plans (and wipes) once: its engine processes load that plan. The suspended older run, resumed,
    commits nothing: its plan is gone."""
    root, rows = corpus
    out = tmp_path / "out"
    old = write_config(tmp_path / "old.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    new = write_config(tmp_path / "new.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    doc = json.loads(new.read_text())
    doc["task"]["prompt"] = "Does this photo show a {category}? Say yes or no."
    new.write_text(json.dumps(doc))
    p = start(old, "--gpus", "2", threads=1)
    try:
        wait_for(lambda: markers(out) and claim_files(out), p, "a unit committed and another claimed")
        os.killpg(p.pid, signal.SIGSTOP)  # the launcher and its engine processes: one process group
        q = start(new, "--restart", "--gpus", "2", threads=1)
        code, err = finish(q)
        assert code == 0, err
        assert summary(err) == (len(rows), len(plan_units(out)))  # nothing was wiped under its engine processes
        want = output(out)
        os.killpg(p.pid, signal.SIGCONT)
        old_code, old_err = finish(p)
    finally:
        kill_group(p)
    assert output(out).equals(want), "the suspended run committed into the restarted output"
    assert old_code == 1, old_err
    assert "the output's plan was replaced" in old_err
    epoch = json.loads((out / "_po_batch" / "plan.json").read_text())["epoch"]
    assert {m["epoch"] for m in markers(out).values()} == {epoch}
    assert set(markers(out)) == set(plan_units(out)) == parts(out)
    assert_each_input_row_once(out, rows)


def test_a_static_shard_is_split_among_the_engine_processes_and_covered_once(corpus, tiny_qwen3_vl, tmp_path):
    root, rows = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    code, err = finish(start(cfg, "--shard", "1/2", "--gpus", "2", threads=1))
    assert code == 0, err
    units = list(plan_units(out))
    done = markers(out)
    assert set(done) == set(units[1::2]) == parts(out) and claim_files(out) == []
    engine_of = {r["pid"]: r["engine"] for r in records(out)}
    for k, uid in enumerate(units[1::2]):  # shard 1/2 on engine e of 2 is the static shard 1 + 2e of 4
        assert engine_of[owner_pid(done[uid])] == k % 2, uid
    ids = output(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(plan_units(out)[u] for u in units[1::2])


def test_run_gpus_is_auto_or_a_count_and_cpu_engines_need_model_device_cpu(tmp_path):
    base = {"model": {"path": "m"}, "input": {"paths": ["d"]}, "task": {"prompt": "p"}, "output": {"path": "o"}}
    assert config_from_dict(base).run.gpus == "auto"
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ConfigError, match=r"^run\.gpus: must be 'auto' or an integer >= 1"):
            config_from_dict(base | {"run": {"gpus": bad}})
    auto, four = config_from_dict(base), config_from_dict(base | {"run": {"gpus": 4}})
    assert engines_count(auto, "cuda", 8) == 8 and engines_count(four, "cuda", 8) == 4
    assert engines_count(auto, "cuda", 8, gpus=2) == 2  # --gpus overrides run.gpus
    assert engines_count(auto, "cpu", 0) == 1
    with pytest.raises(ConfigError, match=r"^run\.gpus: 4 asked for, but 2 GPUs are visible"):
        engines_count(four, "cuda", 2)
    with pytest.raises(ConfigError, match=r"^run\.gpus: 4 asked for, but no CUDA device is available \(set "
                                          r"model\.device: cpu to run 4 CPU engine processes\)"):
        engines_count(four, "cpu", 0)
    cpu = config_from_dict(base | {"model": {"path": "m", "device": "cpu"}, "run": {"gpus": 3}})
    assert engines_count(cpu, "cpu", 0) == 3


def status_text(target) -> str:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "po_batch.cli", "status", str(target)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_status_names_each_worker_and_whose_claims_are_dead_or_expired(corpus, tiny_qwen3_vl, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8)
    a = start(cfg, threads=1)
    try:
        wait_for(lambda: markers(out) and claim_files(out), a, "a unit committed and another claimed")
    finally:
        kill_group(a)  # SIGKILL, and reaped: its pid is gone
    held = len({c.removesuffix(".claim") for c in claim_files(out)} - set(markers(out)))
    text = status_text(out)
    name = f"{os.uname().nodename} pid {a.pid}"
    assert re.search(rf"^worker   {name}: dead, \d+ rows?, {held} dead claims?, updated \d+ s ago$", text, re.M), text
    assert f"claims   {held} dead claim{'s' if held > 1 else ''} of {name} (dead)" in text, text
    assert re.search(r"^workers  1 dead$", text, re.M), text

    short = write_config(tmp_path / "short.yaml", tiny_qwen3_vl, [root / "data"], out, rows_per_unit=8,
                         claim_ttl_s=3)
    b = start(short, "--gpus", "2", threads=1)

    def each_engine_holds_a_claim() -> bool:
        owners = set()
        for name in claim_files(out):
            try:
                owners.add(owner_pid(json.loads((out / "_po_batch" / "claims" / name).read_text())))
            except (FileNotFoundError, ValueError):
                pass
        engines = {r["pid"] for r in records(out) if r.get("engine") is not None}
        return len(engines) == 2 and engines <= owners

    try:
        wait_for(each_engine_holds_a_claim, b, "two engine processes scoring")
        os.killpg(b.pid, signal.SIGSTOP)  # suspended past the ttl: the claims expire, the records fall silent
        import time
        time.sleep(4)
        text = status_text(short)
    finally:
        os.killpg(b.pid, signal.SIGCONT)
        kill_group(b)
    engines = [r for r in records(out) if r.get("engine") is not None]
    for r in engines:
        name = f"{os.uname().nodename} pid {r['pid']} engine {r['engine']}"
        assert re.search(rf"^worker   {name}: silent, ", text, re.M), text
    assert re.search(rf"^claims   \d+ expired claims? of {os.uname().nodename} pid \d+ engine [01] \(silent\)$", text,
                     re.M), text


@pytest.mark.parametrize("task", [
    {"prompt": "Is it a {q}?"},
    {"type": "labels", "prompt": "Which?", "labels": ["cat", "dog"], "system": "Be brief."},
    {"questions": {"a": {"prompt": "Is it a {q}?"}, "b": {"type": "labels", "prompt": "Which?", "labels": ["x", "y"]}},
     "system": "Be brief."},
    {"type": "embed", "pooling": "mean", "dim": 8, "template": "raw"},
    {"type": "rerank", "query": "{q}", "recipe": "qwen3"},
])
def test_a_config_reaches_the_engine_processes_as_it_was_validated(tmp_path, task):
    cfg = config_from_dict({"model": {"path": "./model"}, "input": {"paths": ["data/*.parquet"], "columns": ["q"]},
                            "task": task, "image": {"min_pixels": 64}, "output": {"path": "out"},
                            "run": {"gpus": 2, "workers": 3}}, base_dir=tmp_path)
    sent = json.loads(json.dumps(config_to_dict(cfg)))  # as the launcher writes it to an engine process's stdin
    assert config_from_dict(sent) == cfg
    assert sent["input"]["paths"] == [str(tmp_path / "data" / "*.parquet")]  # resolved once, by the launcher
