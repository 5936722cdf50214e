"""The po-batch command line: run, slurm, status, verify, topk, nearest, demo. Exit codes: 0 done, 1 failed, 2 usage
or config error, 3 stopped by a signal with work left, 4 done here while other workers hold the rest."""

from po_batch.stop import hold_usr1

hold_usr1()  # before the imports below: a Slurm warning meanwhile waits for `run`'s Stop instead of killing

import json  # noqa: E402
import shlex  # noqa: E402
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Score image corpora with Qwen-VL models, prefill only: one forward pass per row.")

ConfigArg = Annotated[Path, typer.Argument(help="The run's config.yaml.", show_default=False)]


def _fail(code: int, msg: str):
    typer.echo(f"po-batch: {msg}", err=True)
    raise typer.Exit(code)


def _config(path: Path):
    from po_batch.config import ConfigError, load_config  # pydantic: not needed by `status OUTPUT_DIR`

    try:
        return load_config(path)
    except ConfigError as e:
        _fail(2, str(e))


def _user_errors():
    """Errors that mean the user's input or setup is wrong (exit 2), as opposed to a failure mid-run (exit 1)."""
    from po_batch.worker import USER_ERRORS

    return USER_ERRORS


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        _fail(2, f"--shard: expected I/N, two integers with 0 <= I < N, e.g. 0/4 (got {shard!r})")
    return i, n


def _version(value: bool):
    if value:
        typer.echo(f"po-batch {metadata.version('po-batch')}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False):
    pass


def _parse_gpus(gpus: str | None):
    from po_batch.config import parse_gpus

    if gpus is None:
        return None
    try:
        return parse_gpus(gpus)
    except ValueError as e:
        _fail(2, f"--gpus: {e}")


@app.command()
def run(config: ConfigArg,
        restart: Annotated[bool, typer.Option("--restart", help="Discard the output's plan and results first.")] = False,
        shard: Annotated[str | None, typer.Option(help="Static slice I/N of the units, without claims "
                                                       "(for filesystems without atomic create).")] = None,
        gpus: Annotated[str | None, typer.Option(help="Engine processes, one per GPU: auto or N (overrides "
                                                      "run.gpus; N CPU engine processes with model.device: cpu).",
                                                 show_default=False)] = None):
    """Run or resume scoring: plan the inputs once, claim units, score them, commit each as a Parquet part."""
    from po_batch.stop import Stop

    stop = Stop()
    stop.install()  # a Slurm warning or a TERM while torch imports is heard, not its default action (USR1 kills)
    part, count = _parse_shard(shard), _parse_gpus(gpus)
    cfg = _config(config)  # before importing torch: a config error is reported in a moment
    from po_batch.launch import local, slurm

    try:
        outcome = local.run(cfg, restart=restart, shard=part, config_path=str(config), gpus=count,
                            labels=slurm.task_labels(), stop=stop)
    except _user_errors() as e:
        _fail(2, str(e))
    except KeyboardInterrupt:
        _fail(3, "interrupted")
    except Exception as e:  # committed units stay committed; a rerun resumes from them
        traceback.print_exc()
        _fail(1, f"the run failed ({type(e).__name__}: {e}); committed units are kept, rerun to resume")
    slurm.requeue_if_warned(outcome.code, outcome.stopped_by, note=lambda line: typer.echo(line, err=True))
    raise typer.Exit(outcome.code)


@app.command()
def slurm(config: ConfigArg,
          tasks: Annotated[int, typer.Option(min=1, help="Array tasks; each runs `po-batch run CONFIG` on its GPUs.",
                                             show_default=False)],
          gpus_per_task: Annotated[int, typer.Option(min=0, help="GPUs per task (0: CPU).")] = 1,
          cpus_per_task: Annotated[int | None, typer.Option(min=1, help="CPU cores per task (prep workers).",
                                                            show_default=False)] = None,
          partition: Annotated[str | None, typer.Option(help="Slurm partition.", show_default=False)] = None,
          time: Annotated[str | None, typer.Option(help="Time limit per task, as sbatch takes it (e.g. 4:00:00); "
                                                        "a task warned before it commits and requeues itself.",
                                                   show_default=False)] = None,
          throttle: Annotated[int | None, typer.Option(min=1, help="At most K tasks at once (--array=...%K).",
                                                       show_default=False)] = None,
          signal_s: Annotated[int, typer.Option("--signal-s", min=1, help="Seconds before the time limit that "
                                                                          "po-batch is warned (SIGUSR1).")] = 120,
          folder: Annotated[Path | None, typer.Option("--dir", help="Where the script and the logs (%A_%a.log) go "
                                                                    "(default: beside the output, OUT.slurm/).",
                                                      show_default=False)] = None,
          submit: Annotated[bool, typer.Option("--submit", help="Submit it with sbatch, print the job id(s).")] = False):
    """Write the sbatch script of a Slurm array job whose tasks share this config's output; --submit submits it."""
    from po_batch.launch.slurm import ArrayJob, SlurmError, default_folder, submit as run_sbatch, write

    cfg = _config(config)
    job = ArrayJob(config.resolve(), tasks, (folder or default_folder(cfg.output.path)).resolve(), gpus_per_task,
                   cpus_per_task, partition, time, throttle, signal_s)
    try:
        cmds = write(job)
    except OSError as e:
        _fail(2, f"cannot write {job.script_path} ({e.strerror})")
    if not submit:
        typer.echo(job.script_path.read_text())
        typer.echo(f"# wrote {job.script_path}; submit it with:")
        typer.echo("\n".join(shlex.join(c) for c in cmds))
        return
    try:
        ids = run_sbatch(cmds)
    except SlurmError as e:
        _fail(1, str(e))
    typer.echo("\n".join(ids))


@app.command()
def status(target: Annotated[str, typer.Argument(help="A config.yaml, an output directory or an output URL (s3://...).",
                                                show_default=False)],
           as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False):
    """Running or stopped; units done/claimed/failed/pending, rows, errors, rate and ETA: from the files alone."""
    from po_batch.data.errors import PlanError
    from po_batch.data.status import read_status
    from po_batch.data.store import open_store

    out, ttl = target, 300.0
    if "://" not in target and Path(target).is_file():
        cfg = _config(Path(target))
        out, ttl = cfg.output.path, cfg.run.claim_ttl_s
    try:
        st = read_status(open_store(out), ttl)
    except PlanError as e:
        _fail(2, str(e))
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo("\n".join(_status_lines(st)))


def _status_lines(st: dict) -> list[str]:
    from po_batch.progress import plural

    eta = ("none (stopped)" if st["state"] == "stopped" else "unknown") if st["eta_s"] is None \
        else f"{st['eta_s'] / 60:.1f} min"
    rate = "unknown" if st["rate_rows_per_s"] is None else f"{st['rate_rows_per_s']:.1f} rows/s"
    kinds = ", ".join(f"{k} {n}" for k, n in st["error_kinds"].items()) or "none"
    stale = ", ".join(plural(st[k], what) for k, what in (("claims_dead", "dead claim"),
                                                          ("claims_expired", "expired claim")) if st[k])
    lines = [f"output   {st['output']}",
             f"state    {st['state']}",
             f"units    {st['units_done']}/{st['units_total']} done, {st['units_claimed']} claimed, "
             f"{st['units_failed']} failed, {st['units_pending']} pending" + (f" ({stale})" if stale else ""),
             f"rows     {st['rows_done']}/{st['rows_total']} done, {st['rows_errored']} with errors ({kinds})",
             f"rate     {rate}, eta {eta}"]
    failed = list(st["failed"].items())
    lines += [f"failed   {unit}: {why}" for unit, why in failed[:3]]
    if len(failed) > 3:
        lines.append(f"failed   ... and {len(failed) - 3} more (po-batch status --json lists them)")
    if st["markers_unreadable"]:
        ids = ", ".join(st["markers_unreadable"][:3]) + (", ..." if len(st["markers_unreadable"]) > 3 else "")
        lines.append(f"markers  {plural(len(st['markers_unreadable']), 'unreadable marker')} ({ids}): "
                     "not done, a rerun redoes them")
    if st["markers_other_epoch"]:
        lines.append(f"markers  {plural(st['markers_other_epoch'], 'unit')} committed under a replaced plan: "
                     "not done")
    lines += [f"inputs   {path} is left out: {why}" for path, why in st["inputs_unreadable"].items()]
    return lines + _worker_lines(st)


WORKER_LINES = 16


def _worker_lines(st: dict) -> list[str]:
    """The workers that are not simply over (running, starting, dead, silent, died), one line each, the others
    counted; then whose the dead and expired claims are."""
    import time
    from collections import Counter

    from po_batch.data.status import worker_name
    from po_batch.progress import plural

    workers = st["workers"]
    if not workers:
        return []
    counts = Counter(w["state"] for w in workers)
    lines = ["workers  " + ", ".join(f"{n} {state}" for state, n in counts.most_common())]
    shown = [w for w in workers if w["state"] not in ("done", "stopped", "failed")]
    now = time.time()
    for w in shown[:WORKER_LINES]:
        what = [w["state"] + (f" (exit code {w['exit_code']})" if w["exit_code"] is not None else ""),
                plural(w["rows"], "row")]
        if w["state"] == "running" and w["rows_per_s"] is not None:
            what.append(f"{w['rows_per_s']:.1f} rows/s")
        if w["state"] == "running" and now - w["progress_at"] >= 60:
            what.append(f"no row for {now - w['progress_at']:.0f} s")
        what += [plural(n, f"{state} claim" if state != "live" else "claim") for state, n in w["claims"].items()]
        what.append(f"updated {max(0.0, now - w['updated_at']):.0f} s ago")
        lines.append(f"worker   {worker_name(w)}: {', '.join(what)}")
    if len(shown) > WORKER_LINES:
        lines.append(f"worker   ... and {len(shown) - WORKER_LINES} more (po-batch status --json lists them)")
    for c in st["stale_claims"]:
        n = ", ".join(plural(c[k], f"{k} claim") for k in ("dead", "expired") if k in c)
        whose = f"{worker_name(c['worker'])} ({c['worker']['state']})" if c["worker"] else \
            f"{c['owner']} (no progress record)"
        lines.append(f"claims   {n} of {whose}")
    return lines


@app.command()
def verify(config: ConfigArg,
           rows: Annotated[int, typer.Option(help="How many rows of the corpus to compare.")] = 16):
    """Compare po-batch with transformers' implementation of the same checkpoint on the corpus's first rows."""
    import torch

    from po_batch.config import resolved_device, resolved_dtype
    from po_batch.verify import verify as run_verify

    cfg = _config(config)
    try:
        device = resolved_device(cfg, torch.cuda.is_available())
        code = run_verify(cfg, rows, device, resolved_dtype(cfg, device))
    except _user_errors() as e:
        _fail(2, str(e))
    raise typer.Exit(code)


OutputArg = Annotated[Path, typer.Argument(help="A po-batch output directory.", show_default=False)]
OutPath = Annotated[Path, typer.Option("--out", help="The Parquet file to write.", show_default=False)]
K = Annotated[int, typer.Option("--k", help="How many rows to keep.")]


@app.command()
def topk(output: OutputArg, by: Annotated[str, typer.Option(help="The score column to rank by.", show_default=False)],
         out: OutPath, k: K = 10,
         group: Annotated[str | None, typer.Option(help="Rank within each value of this column.")] = None,
         ascending: Annotated[bool, typer.Option("--ascending", help="Lowest first.")] = False):
    """The top K rows of a finished output per group (by a score column), streaming over its parts."""
    from po_batch.retrieve import RetrieveError, topk as run_topk

    try:
        n = run_topk(str(output), by, k, str(out), group, ascending)
    except RetrieveError as e:
        _fail(2, str(e))
    typer.echo(f"wrote {n} rows to {out}")


@app.command()
def nearest(images: OutputArg, queries: Annotated[Path, typer.Argument(help="An embedding output of queries.",
                                                                        show_default=False)],
            out: OutPath, k: K = 10,
            column: Annotated[str, typer.Option(help="The embedding column of both outputs.")] = "embedding",
            id_column: Annotated[str, typer.Option("--id", help="The id column of IMAGES.")] = "id",
            query_id: Annotated[str | None, typer.Option("--query-id", help="The id column of QUERIES "
                                                                             "(default: --id).")] = None,
            chunk: Annotated[int, typer.Option(help="Rows of IMAGES compared at once.")] = 65536):
    """For each query embedding, the K nearest rows of an embedding output by cosine (on the GPU when there is one)."""
    from po_batch.retrieve import RetrieveError, nearest as run_nearest

    try:
        n = run_nearest(str(images), str(queries), k, str(out), column, id_column, query_id, chunk)
    except RetrieveError as e:
        _fail(2, str(e))
    typer.echo(f"wrote {n} rows to {out}")


@app.command()
def demo(directory: Annotated[Path, typer.Argument(help="Where to build the demo.")] = Path("demo"),
         rows: Annotated[int, typer.Option(help="Rows in the synthetic corpus.")] = 2000):
    """Build a tiny random Qwen3-VL and a synthetic corpus with planted bad rows, then run po-batch on it (CPU)."""
    from po_batch.demo import DemoError, run_demo

    try:
        code = run_demo(directory, rows)
    except DemoError as e:
        _fail(2, str(e))
    raise typer.Exit(code)


def main():
    app(prog_name="po-batch")


if __name__ == "__main__":
    sys.exit(main())
