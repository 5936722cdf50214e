"""The po-batch command line in real subprocesses: --version and -h, config and --shard errors exit 2 in one line,
a changed prompt is refused and --restart redoes the results, status --json counts a partial run, the log off a
terminal is timestamped, and the demo runs, reruns in its own folder only, and prints commands that work."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from po_batch.demo import CONFIG, MARKER, build_corpus

ROOT = Path(__file__).resolve().parent.parent
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d po-batch: "


def config_text(model, data, out, *edits: tuple[str, str]) -> str:
    """The demo's config (YAML as users write it: `yes: yes` unquoted) on a given model, input folder and output,
    with (old, new) text edits."""
    text = (CONFIG.replace("path: model", f"path: {model}").replace("[data/*.parquet]", f"[{data}]")
            .replace("path: out", f"path: {out}")
            .replace("rows_per_unit: 250", "rows_per_unit: 20").replace("workers: auto", "workers: 0"))
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("old, new, key", [
    ("  batch_tokens: 4096", "  batch_token: 4096", "run: unknown key 'batch_token' (did you mean 'batch_tokens'?)"),
    ("rows_per_unit: 20", "rows_per_unit: '20'", "run.rows_per_unit: expected an integer (got '20')"),
    ("a {category} in", "a {colour} in", "task.prompt: {colour} is not a column"),
], ids=["unknown-key", "bad-type", "prompt-field"])
def test_config_error_exits_2_naming_the_key(po_batch_cli, tmp_path, old, new, key):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(tmp_path / "model", tmp_path / "data", tmp_path / "out", (old, new)))
    res = po_batch_cli("run", cfg, timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"po-batch: {key}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_version_prints_the_package_version(po_batch_cli):
    res = po_batch_cli("--version", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"po-batch {metadata.version('po-batch')}\n"


@pytest.mark.parametrize("command", ["", "run", "status", "verify", "demo"])
def test_h_is_help(po_batch_cli, command):
    res = po_batch_cli(*command.split(), "-h", timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"Usage: po-batch {command}".strip() in res.stdout
    assert res.stdout == po_batch_cli(*command.split(), "--help", timeout=60).stdout


@pytest.mark.parametrize("shard", ["2/2", "abc", "1/0", "-1/3", "1/2/3"])
def test_invalid_shard_exits_2_in_one_line_before_planning(po_batch_cli, tiny_qwen3_vl, tmp_path, shard):
    build_corpus(tmp_path / "data", 20, files=1)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(tiny_qwen3_vl, tmp_path / "data", tmp_path / "out"))
    res = po_batch_cli("run", cfg, "--shard", shard, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"po-batch: --shard: expected I/N, two integers with 0 <= I < N, e.g. 0/4 (got {shard!r})\n"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def partial_run(tiny_qwen3_vl, tmp_path_factory, po_batch_cli):
    """Half the units of a 120-row corpus (3 files, 6 units of 20 rows), done with --shard 0/2, its stderr (a
    pipe) kept in run.log. Of the two bad rows the demo plants, the empty image (row 13) is in unit 0, done; the
    non-image (row 110) in unit 5, not."""
    root = tmp_path_factory.mktemp("partial")
    assert build_corpus(root / "data", 120, files=3) == 2
    cfg = root / "config.yaml"
    cfg.write_text(config_text(tiny_qwen3_vl, root / "data", root / "out",
                               ("  rows_per_unit: 20", "  rows_per_unit: 20\n  log_every_s: 0.1")))
    res = po_batch_cli("run", cfg, "--shard", "0/2")
    assert res.returncode == 0, res.stderr
    (root / "run.log").write_text(res.stderr)
    return root


@pytest.mark.slow
def test_log_off_a_terminal_has_timestamped_start_progress_and_summary_lines(partial_run):
    lines = [line for line in (partial_run / "run.log").read_text().splitlines() if line.startswith("20")]
    start, *ticks, summary = lines
    assert re.fullmatch(STAMP + re.escape(f"run {partial_run / 'config.yaml'} -> {partial_run / 'out'}: "
                                          f"3 units (60 rows) to do, on ") + r"\w+ \(\w+\), prep in the main process",
                        start), start
    assert ticks and all(re.fullmatch(STAMP + r"\d+/60 rows \([\d.]+%\), \d+ row errors?, .* rows/s, eta .*", t)
                         for t in ticks), ticks
    assert re.fullmatch(STAMP + re.escape("run done: 3 units committed, 0 units failed; 59 rows scored, "
                                          "1 row error (empty 1)"), summary), summary


@pytest.mark.slow
def test_status_json_counts_a_partial_run(partial_run, po_batch_cli):
    res = po_batch_cli("status", partial_run / "out", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert {k: st[k] for k in ("units_total", "units_done", "units_claimed", "units_pending", "rows_total",
                               "rows_done", "rows_errored", "error_kinds")} == {
        "units_total": 6, "units_done": 3, "units_claimed": 0, "units_pending": 3, "rows_total": 120,
        "rows_done": 60, "rows_errored": 1, "error_kinds": {"empty": 1}}
    assert st["eta_s"] is None or st["eta_s"] > 0
    by_config = po_batch_cli("status", partial_run / "config.yaml", "--json", timeout=60)
    assert by_config.returncode == 0, by_config.stderr
    assert json.loads(by_config.stdout) == st


@pytest.mark.slow
def test_changed_prompt_is_refused_and_restart_redoes_the_results(partial_run, tiny_qwen3_vl, po_batch_cli, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(partial_run / "out", out)
    done = out / "_po_batch" / "done"
    before = {f.name: f.read_text() for f in done.iterdir()}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(tiny_qwen3_vl, partial_run / "data", out,
                               ("Is there a {category} in this image?", "Does the photo show a {category}?")))

    res = po_batch_cli("run", cfg)
    assert res.returncode == 2, res.stderr
    assert "task.prompt" in res.stderr and "--restart" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert {f.name: f.read_text() for f in done.iterdir()} == before, "a refused run touched the output"

    started = time.time()
    res = po_batch_cli("run", cfg, "--restart")
    assert res.returncode == 0, res.stderr
    markers = [json.loads(f.read_text()) for f in done.iterdir()]
    assert len(markers) == 6 and all(m["finished_at"] >= started for m in markers)
    fingerprint = json.loads((out / "_po_batch" / "plan.json").read_text())["fingerprint"]
    assert fingerprint["task.prompt"] == "Does the photo show a {category}? Answer yes or no."
    ids = ds.dataset(str(out)).to_table().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120


@pytest.mark.parametrize("make", [lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), lambda d: d.write_text("mine")],
                         ids=["foreign-folder", "file"])
def test_demo_refuses_a_folder_it_did_not_make(po_batch_cli, tmp_path, make):
    target = tmp_path / "mine"
    make(target)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = po_batch_cli("demo", target, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith(f"po-batch: demo: {target} is ") and res.stderr.count("\n") == 1, res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_demo_reruns_in_its_own_folder_and_its_closing_commands_work_in_a_shell(tmp_path):
    """As after `make demo` in a checkout: the environment is .venv in the current folder, the demo in demo/."""
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    python = f".venv/bin/{Path(sys.executable).name}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def shell(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)

    first = shell(f"{python} -m po_batch.cli demo demo --rows 20")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "demo" / MARKER).is_file()
    res = shell(f"{python} -m po_batch.cli demo demo --rows 200")
    assert res.returncode == 0, res.stdout + res.stderr
    table = ds.dataset(str(tmp_path / "demo" / "out")).to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 200
    assert sorted(e.split(":")[0] for e in table.column("error").to_pylist() if e) == ["empty", "not_image"]

    read, status, again = [line.strip() for line in res.stdout.splitlines() if line.startswith("  ")][-3:]
    assert read.startswith(f"{python} -c ") and status.startswith(".venv/bin/po-batch status ") and \
        again.startswith(".venv/bin/po-batch run "), res.stdout
    shown = shell(read)
    assert shown.returncode == 0 and "'id': 'img-000000'" in shown.stdout, shown.stdout + shown.stderr
    counted = shell(status)
    assert counted.returncode == 0 and "4/4 done" in counted.stdout, counted.stdout + counted.stderr
    rerun = shell(again)
    assert rerun.returncode == 0 and "run done: 4 units committed" in rerun.stderr, rerun.stderr


def test_configs_demo_yaml_is_what_the_demo_writes():
    assert (Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").read_text() == CONFIG


def test_a_slurm_warning_before_run_installs_its_handler_is_kept_for_it_not_fatal():
    """SIGUSR1's default action kills: one that comes while the CLI imports (a requeued task warned at once) is held
    and reaches run's Stop, which then stops (and requeues) as for a warning mid-run."""
    code = ("import os, signal; import po_batch.cli; os.kill(os.getpid(), signal.SIGUSR1); "
            "from po_batch.stop import Stop; s = Stop(); s.install(); print(s.reason)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["SIGUSR1"], res
