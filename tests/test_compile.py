"""The fused graphs of layers/compile.py: on CUDA a second process on the same machine runs them from inductor's
on-disk cache, as a rerun of `po-batch run` after an interruption does; on the CPU they equal the eager layers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_fp8 import png

from po_batch.tiny import build_checkpoint

SCORE = r"""
import io, json, sys
import numpy as np
from PIL import Image
from po_batch.config import config_from_dict
from po_batch.spec import open_spec

spec = open_spec(config_from_dict(json.loads(sys.argv[1])), "cuda", "bfloat16", 0)
engine = spec.load_engine()
rows = []
for i in range(6):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (64 + 8 * i, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    rows.append((buf.getvalue(), {"id": f"r{i}", "category": "cat"}))
print(json.dumps(engine.score([spec.prep(r) for r in rows])[:, 0].tolist()))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's cache of compiled CUDA graphs: CUDA only")
def test_a_second_process_runs_the_fused_graphs_from_inductor_s_on_disk_cache(tmp_path):
    # Under torch 2.11 (H200) the second process failed in Triton ("'NoneType' object does not support the context
    # manager protocol") while reading inductor's multi-kernel picks, until layers/compile.py turned that file off.
    ckpt = build_checkpoint(tmp_path / "model", "qwen3_vl", vision={"hidden_size": 64})  # flash: head size 16
    cfg = {"model": {"path": str(ckpt)},
           "input": {"paths": [str(tmp_path / "unused.parquet")], "image_column": "image", "columns": ["category"]},
           "task": {"prompt": "Is there a {category} in this image? Answer yes or no."},
           "output": {"path": str(tmp_path / "out")}, "run": {"workers": 0}}
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = [subprocess.run([sys.executable, "-c", SCORE, json.dumps(cfg)], env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    first, second = (np.array(json.loads(run.stdout.strip().splitlines()[-1])) for run in runs)
    assert first.shape == (6, 2) and np.abs(first - second).max() < 0.05


def test_the_fused_graphs_compiled_on_the_cpu_equal_the_eager_layers(tmp_path):
    # inductor compiles the same graphs for the CPU: every method that layers/compile.py fuses (the tower's blocks,
    # its ends -- Qwen3-VL's have the most: interpolated positions, DeepStack mergers -- and the decoder's layers)
    # runs compiled, without a graph break, and scores as eager does
    import torch._dynamo
    from torch._dynamo.utils import counters

    from po_batch.config import config_from_dict
    from po_batch.layers.compile import FUSED
    from po_batch.spec import open_spec

    ckpt = build_checkpoint(tmp_path / "model", "qwen3_vl")
    cfg = config_from_dict({"model": {"path": str(ckpt)}, "output": {"path": str(tmp_path / "out")},
                            "input": {"paths": [str(tmp_path / "unused.parquet")], "image_column": "image",
                                      "columns": ["category"]},
                            "task": {"prompt": "Is there a {category} in this image? Answer yes or no."}})
    spec = open_spec(cfg, "cpu", "float32", 0)
    engine = spec.load_engine()
    samples = [spec.prep((png(i), {"category": "cat"})) for i in range(4)]
    eager = engine.score(samples)
    torch._dynamo.reset()
    counters.clear()
    FUSED.enable(True)
    try:
        fused = engine.score(samples)
        methods = {fn.__name__ for fn in FUSED.compiled}
    finally:
        FUSED.enable(False)
        FUSED.compiled.clear()
        torch._dynamo.reset()
    assert {"embed", "merge", "attn_in", "attn_out"} <= methods and not counters["graph_break"]
    assert np.abs(fused - eager).max() < 1e-4
