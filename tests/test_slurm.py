"""Slurm array jobs on a real one-node Slurm (tests/slurm_cluster.py), CPU and the tiny model: the array that
`po-batch slurm` wrote, with one task requeued mid-run, another cancelled and the array submitted again, writes every
row once with the scores of a local run; a task warned before its time limit commits and requeues itself; an array
over MaxArraySize goes in pieces with offsets, exit 4 (other workers hold the rest) completes a task, and a submission
that sbatch refuses is one line."""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from test_pipeline import (
    assert_each_input_row_once,
    claim_files,
    finish,
    markers,
    output,
    owner_pid,
    parts,
    picture,
    plan_units,
    start,
    write_config,
    write_parquet,
)

pytestmark = pytest.mark.slow

ROWS = 1500  # a few seconds of scoring for three tasks on two cores: time to requeue and cancel tasks mid-run


@pytest.fixture(scope="module")
def cluster(request):
    why = slurm_cluster.missing()
    if why:
        msg = f"SKIPPING the Slurm tests, no one-node Slurm could be started: {why}"
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(msg, red=True, bold=True)
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    c = slurm_cluster.Cluster(max_array_size=3).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(11)
    ids = [f"s-{i:04d}" for i in range(ROWS)]
    for f in range(2):
        write_parquet(root / "data" / f"{f}.parquet", [{"id": i, "image": picture(rng, "JPEG"), "category": "dog"}
                                                       for i in ids[f::2]])
    return root, dict.fromkeys(ids)


def config(tmp_path, ckpt, corpus, name="config.yaml") -> Path:
    root, _ = corpus
    return write_config(tmp_path / name, ckpt, [root / "data"], tmp_path / "out", rows_per_unit=20)


@pytest.fixture(scope="module")
def local_run(corpus, tiny_qwen3_vl, tmp_path_factory):
    """The same config run locally on one thread, as the tasks run (OMP_NUM_THREADS=1 below): the reference scores,
    and how long this machine takes from a start to the first commit."""
    base = tmp_path_factory.mktemp("local")
    t = time.time()
    code, err = finish(start(config(base, tiny_qwen3_vl, corpus), threads=1))
    assert code == 0, err
    first = min(m["finished_at"] for m in markers(base / "out").values())
    return output(base / "out"), first - t


def slurm_env(cluster) -> dict:
    return {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def po_batch_slurm(cluster, cfg: Path, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "po_batch.cli", "slurm", str(cfg), "--gpus-per-task", "0",
                          "--cpus-per-task", "1", *map(str, args)], capture_output=True, text=True,
                         env=slurm_env(cluster), timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def task_records(out: Path) -> list[dict]:
    folder = out / "_po_batch" / "workers"
    return [json.loads(f.read_text()) for f in folder.glob("*.json")] if folder.is_dir() else []


def wait(cond, what: str, cluster, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}; queue {cluster.jobs()}"
        time.sleep(0.2)


def logs(out: Path) -> dict[str, str]:
    """array task (JOB_TASK) -> its log."""
    return {f.stem: f.read_text() for f in Path(f"{out}.slurm").glob("*.log")}


def assert_same_scores(out: Path, local) -> None:
    local, got = local[0], output(out)
    for name in local.column_names:
        assert got.column(name).equals(local.column(name)), f"{name} differs from the local run's"


def test_array_with_a_task_requeued_and_one_cancelled_then_resubmitted_writes_every_row_once(
        cluster, corpus, local_run, tiny_qwen3_vl, tmp_path):
    cfg = config(tmp_path, tiny_qwen3_vl, corpus)
    out = tmp_path / "out"
    job = po_batch_slurm(cluster, cfg, "--tasks", 3, "--submit").stdout.split()[0]
    script = Path(f"{out}.slurm") / "po-batch.sbatch"
    text = script.read_text()
    for want in ("#SBATCH --array=0-2\n", "#SBATCH --requeue\n", "#SBATCH --open-mode=append\n",
                 f"#SBATCH --output={out}.slurm/%A_%a.log\n", "#SBATCH --signal=USR1@120\n", "\nsrun "):
        assert want in text, text

    def committed_by(task: int) -> bool:  # the records name the task at once; markers show commits at once
        pids = {r["pid"] for r in task_records(out) if r.get("slurm_task") == task}
        return any(owner_pid(m) in pids for m in markers(out).values())

    wait(lambda: committed_by(1) and committed_by(2), "tasks 1 and 2 each committing a unit", cluster)
    done = len(markers(out))
    cluster.run("scontrol", "requeue", f"{job}_1")  # TERM now, run again with SLURM_RESTART_COUNT=1
    cluster.run("scancel", f"{job}_2")  # TERM: it commits what it holds and stops
    again = po_batch_slurm(cluster, cfg, "--tasks", 3, "--submit").stdout.split()[0]  # shares the plan at once
    cluster.wait_for_empty_queue(timeout=240)
    assert done < len(plan_units(out)) * 0.75, "the tasks were requeued and cancelled near the end, not mid-run"

    assert_each_input_row_once(out, corpus[1])
    assert_same_scores(out, local_run)
    assert set(markers(out)) == set(plan_units(out)) == parts(out) and claim_files(out) == []
    states = {f"{j}_{t}": cluster.job(f"{j}_{t}") for j in (job, again) for t in range(3)}
    assert states[f"{job}_2"]["JobState"] == "CANCELLED"
    for name, s in states.items():
        if name != f"{job}_2":
            assert (s["JobState"], s["ExitCode"]) == ("COMPLETED", "0:0"), (name, s)
    assert states[f"{job}_1"]["Restarts"] == "1"
    log = logs(out)
    assert f"Slurm task 1 (job {job}_1), restart 0" in log[f"{job}_1"]
    assert f"Slurm task 1 (job {job}_1), restart 1" in log[f"{job}_1"]  # --open-mode=append: both runs
    assert "SIGTERM: finishing claimed units, then stopping" in log[f"{job}_2"]
    assert "po-batch: run stopped by a signal (rerun to resume): " in log[f"{job}_2"]
    # each task's records name it; the cancelled one committed units and released its claims
    recs = task_records(out)
    assert {r["slurm_task"] for r in recs} <= {0, 1, 2} and {r["state"] for r in recs} <= {"done", "stopped"}
    assert any(r["slurm_job"] == f"{job}_2" and r["state"] == "stopped" and r["units"] >= 1 for r in recs)
    status = subprocess.run([sys.executable, "-m", "po_batch.cli", "status", str(out)], capture_output=True,
                            text=True, timeout=60)
    assert re.search(r"^state    done$", status.stdout, re.M) and "workers  " in status.stdout, status.stdout


def test_a_task_warned_before_its_time_limit_commits_requeues_itself_and_the_array_finishes(
        cluster, corpus, local_run, tiny_qwen3_vl, tmp_path):
    cfg = config(tmp_path, tiny_qwen3_vl, corpus)
    out = tmp_path / "out"
    # --time 1 with the default warning 120 s before the limit: slurmctld sends it at its first time-limit check
    # after the start, and it checks every 30 s from its own start. Submit a little more than a start takes here
    # before a check, so that the warning comes mid-run: after the first commits, before the corpus is done.
    lead = min(cluster.CHECK_S - 4, 1.3 * local_run[1] + 4)
    time.sleep((cluster.CHECK_S - lead - (time.time() - cluster.started_at)) % cluster.CHECK_S)
    job = po_batch_slurm(cluster, cfg, "--tasks", 1, "--time", 1, "--submit").stdout.split()[0]
    cluster.wait_for_empty_queue(timeout=240)

    log = logs(out)[f"{job}_0"]
    assert "SIGUSR1: finishing claimed units, then stopping" in log, log
    assert f"po-batch: near the time limit: requeueing Slurm job {job}_0" in log, log
    assert f"Slurm task 0 (job {job}_0), restart 1" in log, log
    state = cluster.job(f"{job}_0")
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0") and int(state["Restarts"]) >= 1, (state, log)
    # the warned run committed units before it requeued: the next run resumed from them
    recs = sorted(task_records(out), key=lambda r: r["started_at"])
    assert recs[0]["state"] == "stopped" and recs[0]["units"] >= 1 and recs[0]["slurm_restarts"] == 0, recs
    assert recs[-1]["state"] == "done" and recs[-1]["slurm_restarts"] >= 1, recs
    assert_each_input_row_once(out, corpus[1])
    assert_same_scores(out, local_run)
    assert claim_files(out) == []


def test_an_array_over_max_array_size_goes_in_pieces_and_exit_4_completes_its_tasks(
        cluster, corpus, tiny_qwen3_vl, tmp_path):
    """MaxArraySize is 3 here: 5 tasks are arrays 0-2 and 0-1 (offset 3). A live process of this host holds every
    unit not done: each task finds nothing it may claim and exits 4, which must not fail it."""
    cfg = config(tmp_path, tiny_qwen3_vl, corpus)
    out = tmp_path / "out"
    code, err = finish(start(cfg, "--shard", "0/1000", threads=1))  # plan it, score its first unit
    assert code == 0, err
    left = sorted(set(plan_units(out)) - set(markers(out)))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        from po_batch.data.claims import owner_prefix

        epoch = json.loads((out / "_po_batch" / "plan.json").read_text())["epoch"]
        claims = out / "_po_batch" / "claims"
        claims.mkdir(exist_ok=True)
        for uid in left:
            (claims / f"{uid}.claim").write_text(json.dumps({"owner": owner_prefix(holder.pid) + "feedbeef",
                                                             "epoch": epoch}))
        res = po_batch_slurm(cluster, cfg, "--tasks", 5)
        cmds = res.stdout.strip().splitlines()[-2:]
        assert cmds[0].endswith(f"sbatch --parsable {out}.slurm/po-batch.sbatch")
        assert "--array=0-1 --export=ALL,PO_BATCH_TASK_OFFSET=3" in cmds[1]
        assert "#SBATCH --array=0-2\n" in res.stdout
        jobs = po_batch_slurm(cluster, cfg, "--tasks", 5, "--submit").stdout.split()
        assert len(jobs) == 2
        cluster.wait_for_empty_queue(timeout=240)
    finally:
        holder.kill()
        holder.wait()
    log = logs(out)
    seen = {}
    for name, text in log.items():
        m = re.search(r"Slurm task (\d+) \(job (\S+)\)", text)
        seen[int(m[1])] = m[2]
        assert "po-batch: exit 4" in text and "left to the other workers" in text, text
        state = cluster.job(name)
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), (name, state)
    assert seen == {0: f"{jobs[0]}_0", 1: f"{jobs[0]}_1", 2: f"{jobs[0]}_2", 3: f"{jobs[1]}_0", 4: f"{jobs[1]}_1"}


def test_a_submission_that_sbatch_refuses_is_one_line_naming_the_script(cluster, corpus, tiny_qwen3_vl, tmp_path):
    cfg = config(tmp_path, tiny_qwen3_vl, corpus)
    res = subprocess.run([sys.executable, "-m", "po_batch.cli", "slurm", str(cfg), "--tasks", "2", "--gpus-per-task",
                          "0", "--partition", "nosuch", "--submit"], capture_output=True, text=True,
                         env=slurm_env(cluster), timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"po-batch: sbatch refused {tmp_path}/out.slurm/po-batch.sbatch: Batch job "
                                 "submission failed: Invalid partition name specified"), res.stderr
    assert res.stderr.count("\n") == 1 and not cluster.jobs()


@pytest.mark.parametrize("code, requeued, exit_code", [(138, True, 0), (4, False, 0), (3, False, 3), (1, False, 1)])
def test_the_script_requeues_a_task_the_warning_killed_while_it_started(tmp_path, code, requeued, exit_code):
    """The ~50 ms before Python runs po-batch's first line are the one time the warning's default action can kill
    it (exit 138): the sbatch script then requeues the task itself. Its own bash runs it, with srun and scontrol
    on PATH replaced by scripts that exit `code` and record their arguments."""
    from po_batch.launch.slurm import ArrayJob, script

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in {"srun": f"exit {code}", "scontrol": f'echo "$@" >> {tmp_path}/scontrol.args'}.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    job = ArrayJob(config=tmp_path / "config.yaml", tasks=2, folder=tmp_path / "slurm")
    (tmp_path / "job.sbatch").write_text(script(job, 2))
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1"}
    res = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, env=env, timeout=60)
    args = (tmp_path / "scontrol.args").read_text().split() if requeued else []
    assert res.returncode == exit_code and args == (["requeue", "41_1"] if requeued else []), res
    assert ("killed by the time-limit warning while starting: requeueing Slurm job 41_1" in res.stdout) == requeued
