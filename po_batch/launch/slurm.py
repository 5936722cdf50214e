"""The Slurm executor: `po-batch slurm` writes (with --submit, submits) the sbatch script of an array job whose tasks
each run `po-batch run` on the GPUs Slurm gave them, sharing one plan through claims, with no coordinator. Under
srun the warning signal before the time limit (--signal=USR1@lead, without B:) reaches po-batch, which commits what
it finished, releases its claims and requeues its own task; exit 4 (other tasks hold the rest) is not a failure.
Arrays over the cluster's MaxArraySize are submitted in pieces, each with the index offset of its first task."""

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SIGNAL = "USR1"  # what Slurm sends before the time limit; po-batch stops on it, like on TERM, and then requeues
# a task's exit code when the warning's default action killed it (before po-batch could install its handler)
KILLED_BY_WARNING = 128 + signal.Signals[f"SIG{SIGNAL}"]
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default, when scontrol cannot tell


class SlurmError(Exception):
    """A one-line problem with the Slurm setup or a Slurm command (sbatch refused the script, ...)."""


@dataclass
class ArrayJob:
    config: Path  # absolute
    tasks: int
    folder: Path  # the script and the logs (%A_%a.log)
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    throttle: int | None = None
    signal_s: int = 120  # how long before the time limit po-batch is warned

    @property
    def script_path(self) -> Path:
        return self.folder / "po-batch.sbatch"


def default_folder(output: str) -> Path:
    """Beside the output (OUT.slurm/), not in it: --restart clears OUT/_po_batch, and pyarrow.dataset would try to
    read logs inside OUT as Parquet. An object-store output has no beside: the current directory then."""
    if "://" in output and not output.startswith("file://"):
        return Path.cwd() / "po-batch-slurm"
    return Path(output.removeprefix("file://") + ".slurm")


def max_array_size() -> int:
    """MaxArraySize from `scontrol show config`: array indices must stay below it."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m[1]) if m else DEFAULT_MAX_ARRAY_SIZE


def pieces(tasks: int, max_size: int) -> list[tuple[int, int]]:
    """(index offset, task count) of each array to submit: at most max_size tasks each (indices 0..max_size-1)."""
    return [(start, min(max_size, tasks - start)) for start in range(0, tasks, max_size)]


def array_spec(count: int, throttle: int | None) -> str:
    return f"0-{count - 1}" + (f"%{throttle}" if throttle else "")


def script(job: ArrayJob, first: int) -> str:
    """The sbatch script; its --array is the first piece's (`first` tasks), the others' come on sbatch's command
    line with their offset in PO_BATCH_TASK_OFFSET."""
    opts = [f"--job-name=po-batch-{Path(job.config).stem}", f"--array={array_spec(first, job.throttle)}",
            "--ntasks=1", "--requeue", "--open-mode=append", f"--output={job.folder}/%A_%a.log",
            f"--signal={SIGNAL}@{job.signal_s}"]
    step = ["--ntasks=1"]
    # srun reads neither from the job's environment since Slurm 22.05: the step asks for them again
    if job.gpus_per_task:
        opts.append(f"--gpus-per-task={job.gpus_per_task}")
        step.append(f"--gpus-per-task={job.gpus_per_task}")
    if job.cpus_per_task:
        opts.append(f"--cpus-per-task={job.cpus_per_task}")
        step.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.partition:
        opts.append(f"--partition={job.partition}")
    if job.time:
        opts.append(f"--time={job.time}")
    run = [sys.executable, "-m", "po_batch.cli", "run", str(job.config)]
    stamp = "$(date '+%Y-%m-%d %H:%M:%S') po-batch:"
    return "\n".join([
        "#!/bin/bash",
        f"# {job.tasks} array tasks of `po-batch run {job.config}`, sharing one plan through claims.",
        "# Written by `po-batch slurm`; submit it with the sbatch command(s) it printed.",
        *(f"#SBATCH {o}" for o in opts),
        "",
        f'echo "{stamp} Slurm task $((${{PO_BATCH_TASK_OFFSET:-0}} + SLURM_ARRAY_TASK_ID)) '
        f'(job ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}), restart ${{SLURM_RESTART_COUNT:-0}}, on $(hostname)"',
        "# Under srun, Slurm's warning before the time limit (--signal without B:) reaches po-batch: it finishes its",
        "# batch, commits complete units, releases its claims and requeues this task.",
        f"srun {' '.join(step)} {shlex.join(run)}",
        "rc=$?",
        f'echo "{stamp} exit $rc"',
        "# 4: this task is done, other tasks hold the rest of the units: not a failure",
        'if [ "$rc" -eq 4 ]; then rc=0; fi',
        f"# {KILLED_BY_WARNING}: the warning ({SIGNAL}) killed po-batch while Python started, before it could hear it: "
        "requeue",
        "# this task as po-batch itself would have (its claims are seen dead, or expire)",
        f'if [ "$rc" -eq {KILLED_BY_WARNING} ]; then',
        f'  echo "{stamp} killed by the time-limit warning while starting: requeueing Slurm job '
        '${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" && rc=0',
        'fi',
        'exit "$rc"',
        ""])


def sbatch_commands(job: ArrayJob, parts: list[tuple[int, int]]) -> list[list[str]]:
    cmds = []
    for k, (offset, count) in enumerate(parts):
        extra = [] if k == 0 else [f"--array={array_spec(count, job.throttle)}",
                                   f"--export=ALL,PO_BATCH_TASK_OFFSET={offset}"]
        cmds.append(["sbatch", "--parsable", *extra, str(job.script_path)])
    return cmds


def write(job: ArrayJob) -> list[list[str]]:
    """Write the script (and make the log folder); returns the sbatch commands that submit the whole array."""
    parts = pieces(job.tasks, max_array_size())
    job.folder.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(script(job, parts[0][1]))
    job.script_path.chmod(0o755)
    return sbatch_commands(job, parts)


def submit(cmds: list[list[str]]) -> list[str]:
    """Run the sbatch commands; returns the array job ids."""
    ids = []
    for cmd in cmds:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except OSError as e:
            raise SlurmError(f"cannot run sbatch ({e.strerror})") from None
        if res.returncode:  # sbatch's last line says why ("Batch job submission failed: Invalid partition ...")
            why = (res.stderr.strip() or res.stdout.strip() or f"exit code {res.returncode}").splitlines()[-1]
            raise SlurmError(f"sbatch refused {cmd[-1]}: {why.removeprefix('sbatch: error: ')}")
        ids.append(res.stdout.strip().split(";")[0])
    return ids


def task_labels(env=os.environ) -> dict:
    """What a worker's progress record says of the Slurm task it runs in; {} outside Slurm."""
    if "SLURM_JOB_ID" not in env:
        return {}
    if "SLURM_ARRAY_TASK_ID" not in env:
        return {"slurm_job": env["SLURM_JOB_ID"]}
    index = int(env["SLURM_ARRAY_TASK_ID"])
    return {"slurm_job": f"{env['SLURM_ARRAY_JOB_ID']}_{index}",
            "slurm_task": int(env.get("PO_BATCH_TASK_OFFSET", "0")) + index,
            "slurm_restarts": int(env.get("SLURM_RESTART_COUNT", "0"))}


def requeue_if_warned(code: int, stopped_by: str | None, note=print) -> None:
    """A Slurm task that the time-limit warning stopped with work left (exit 3) requeues itself: its array task
    alone, ARRAY_JOB_TASK (a task's bare SLURM_JOB_ID is the whole array's for one of them, and would requeue every
    task). `scontrol requeue` sends TERM at once: this is the run's last act."""
    if code != 3 or stopped_by != f"SIG{SIGNAL}" or "SLURM_JOB_ID" not in os.environ:
        return
    env = os.environ
    target = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in env \
        else env["SLURM_JOB_ID"]
    note(f"po-batch: near the time limit: requeueing Slurm job {target}")
    try:
        res = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        note(f"po-batch: could not requeue {target} ({e}); submit the array again to finish")
        return
    if res.returncode:
        note(f"po-batch: could not requeue {target} ({res.stderr.strip()}); submit the array again to finish")
