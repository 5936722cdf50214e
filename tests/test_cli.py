"""The po-batch command line in real subprocesses: config errors and a changed prompt exit 2 naming the key,
--restart redoes the results, status --json counts a partial run, and the demo runs."""

import json
import shutil
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from po_batch.demo import CONFIG, build_corpus


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


@pytest.fixture(scope="module")
def partial_run(tiny_qwen3_vl, tmp_path_factory, po_batch_cli):
    """Half the units of a 120-row corpus (3 files, 6 units of 20 rows), done with --shard 0/2. Of the two bad
    rows the demo plants, the empty image (row 13) is in unit 0, done; the non-image (row 110) in unit 5, not."""
    root = tmp_path_factory.mktemp("partial")
    assert build_corpus(root / "data", 120, files=3) == 2
    cfg = root / "config.yaml"
    cfg.write_text(config_text(tiny_qwen3_vl, root / "data", root / "out"))
    res = po_batch_cli("run", cfg, "--shard", "0/2")
    assert res.returncode == 0, res.stderr
    return root


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


@pytest.mark.slow
def test_demo_runs_to_completion(po_batch_cli, tmp_path):
    res = po_batch_cli("demo", tmp_path / "demo", "--rows", "200")
    assert res.returncode == 0, res.stdout + res.stderr
    table = ds.dataset(str(tmp_path / "demo" / "out")).to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 200
    assert sorted(e.split(":")[0] for e in table.column("error").to_pylist() if e) == ["empty", "not_image"]


def test_configs_demo_yaml_is_what_the_demo_writes():
    assert (Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").read_text() == CONFIG
