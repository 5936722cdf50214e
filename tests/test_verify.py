"""`po-batch verify` and `po-batch run` for every family: on a small Parquet corpus, the run's logits equal
transformers' own implementation of the same checkpoint (float32, CPU), and verify says so."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from po_batch import worker
from po_batch.config import config_from_dict
from po_batch.spec import open_spec
from po_batch.tiny import build_checkpoint
from po_batch.verify import Transformers, first_rows, verify

FAMILIES = ["qwen3_vl", "qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3", "qwen2", "gemma", "gemma2"]


def picture(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG" if seed % 2 else "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    ckpt = build_checkpoint(root / "model", family)
    vision = family.endswith("_vl") or family == "llava_next"
    n = 7
    table = {"id": [f"r{i}" for i in range(n)], "category": ["cat", "dog", "car", "tree", "house", "boat", "bird"]}
    if vision:
        images = [picture(40 + 37 * i, 200 - 21 * i, i) for i in range(n)]
        images[3] = b"not an image"
        table["image"] = pa.array(images, pa.binary())
    else:
        table["doc"] = [" ".join(["a photo of a"] + [table["category"][i]] * (i + 1)) for i in range(n)]
    pq.write_table(pa.table(table), root / "data.parquet", row_group_size=3)
    cfg = config_from_dict({
        "model": {"path": str(ckpt), "device": "cpu"},
        "input": {"paths": [str(root / "data.parquet")], "image_column": "image" if vision else None,
                  "columns": ["category"] if vision else ["category", "doc"]},
        "task": {"prompt": "Is there a {category} in this image? Answer yes or no." if vision else
                 "Document: {doc}\nIs this document about a {category}? Answer yes or no."},
        "output": {"path": str(root / "out")},
        "run": {"workers": 0, "rows_per_unit": 4, "batch_tokens": 512}})
    return family, cfg


def test_verify_agrees_with_transformers(setup):
    _, cfg = setup
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 7, "cpu", "float32", console) == 0
    text = console.file.getvalue()
    assert "OK" in text and "MISMATCH" not in text


def test_run_output_equals_transformers(setup):
    family, cfg = setup
    assert worker.run(cfg) == 0
    out = ds.dataset(cfg.output.path).to_table().sort_by("id").to_pylist()
    assert [r["id"] for r in out] == [f"r{i}" for i in range(7)]
    spec = open_spec(cfg, "cpu", "float32", workers=0)
    oracle, (task,) = Transformers(spec), spec.tasks.tasks.values()
    for row, (image, fields) in zip(out, first_rows(cfg, 7)):
        if image == b"not an image":  # the planted bad image
            assert row["error"].startswith("not_image") and row["p_yes"] is None
            continue
        oracle.image = Image.open(io.BytesIO(image)).convert("RGB") if image else None
        ref = task.reference(oracle, [fields])[0]
        assert row["error"] is None
        assert abs(row["yes_logit"] - ref[0]) <= 1e-3 and abs(row["no_logit"] - ref[1]) <= 1e-3, (family, row, ref)


def test_verify_reports_a_mismatch_and_exits_1(setup, monkeypatch):
    family, cfg = setup
    if family != "qwen3_vl":
        pytest.skip("one family is enough to see the failure path")
    from po_batch.engine import runner

    score = runner.Engine.score
    monkeypatch.setattr(runner.Engine, "score", lambda self, samples: score(self, samples) + 0.01)
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 4, "cpu", "float32", console) == 1
    assert "MISMATCH" in console.file.getvalue()


def test_verify_skips_rows_po_batch_flags_that_transformers_would_refuse(tmp_path):
    """An aspect ratio of 250:1 is a row error for po-batch and an exception in transformers' processor: verify
    says so for that row and compares the others."""
    ckpt = build_checkpoint(tmp_path / "model", "qwen3_vl")
    pq.write_table(pa.table({"id": ["thin", "ok"], "category": ["cat", "dog"],
                             "image": pa.array([picture(1000, 4, 1), picture(64, 48, 2)], pa.binary())}),
                   tmp_path / "data.parquet")
    cfg = config_from_dict({"model": {"path": str(ckpt), "device": "cpu"},
                            "input": {"paths": [str(tmp_path / "data.parquet")], "columns": ["category"]},
                            "task": {"prompt": "Is there a {category}? Answer yes or no."},
                            "output": {"path": str(tmp_path / "out")}, "run": {"workers": 0}})
    console = Console(file=io.StringIO(), width=250)
    assert verify(cfg, 2, "cpu", "float32", console) == 0
    text = console.file.getvalue()
    assert "aspect" in text and "skipped: po-batch flags the row" in text and "1 row-questions compared" in text


def test_verify_refuses_zero_rows_in_one_line(tmp_path, po_batch_cli):
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{path: {build_checkpoint(tmp_path / 'model', 'qwen3')}, device: cpu}}\n"
                      "input: {paths: [nothing.parquet], image_column: null}\n"
                      "task: {prompt: 'Is it? Answer yes or no.'}\noutput: {path: out}\n")
    res = po_batch_cli("verify", config, "--rows", "0")
    assert res.returncode == 2 and res.stderr.strip() == "po-batch: --rows: must be at least 1 (got 0)", res.stderr
