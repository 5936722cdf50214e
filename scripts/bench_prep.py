"""CPU prep cost per image on one core: po-batch's `prepare` (decode -> uint8 pixels at the Qwen grid) against
transformers' image processor (decode -> normalised, patchified float32), both from the same JPEG bytes.

    python scripts/bench_prep.py [--iters 40]

Prints a table last and writes bench/results/prep-<date>-<host>.json.
"""

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core: set before numpy loads BLAS
    os.environ[var] = "1"

import argparse
import io
import json
import platform
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from benchlib import CONFIGS
from po_batch.prep.image import decode, prepare, smart_resize, spec_from_preprocessor_config

CONFIG = CONFIGS / "Qwen3-VL-2B-Instruct"
# (height, width, max_pixels override or None). The first two sit on the published config's 32-pixel grid; the
# others make both sides resize: a web-sized photo rounded to the grid, a photo capped at 448*448 pixels, and a
# 12-megapixel camera photo capped at 1024*1024.
CASES = [(448, 448, None), (960, 1280, None), (750, 1000, None), (960, 1280, 448 * 448), (3000, 4000, 1024 * 1024)]


def photo_jpeg(h: int, w: int, seed: int = 0) -> bytes:
    """Photo-like: smooth gradients, some texture and sensor-like noise, JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + 1) + y, np.cos(5 * y) * x, np.sin(4 * (x + y))], -1) * 80 + 128
    base += 10 * np.sin(60 * x)[..., None] * np.cos(45 * y)[..., None]
    arr = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def timed(fn, data: bytes, iters: int) -> list[float]:
    """CPU ms per call: process time, not wall time, so that other work on a shared machine does not count."""
    out = []
    for _ in range(iters):
        t0 = time.process_time()
        fn(data)
        out.append((time.process_time() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch
    import torchvision
    import transformers
    from transformers import AutoImageProcessor

    torch.set_num_threads(1)
    hf = AutoImageProcessor.from_pretrained(CONFIG)
    published = json.loads((CONFIG / "preprocessor_config.json").read_text())

    rows = []
    for h, w, max_pixels in CASES:
        spec = spec_from_preprocessor_config(published, max_pixels=max_pixels)
        size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
        data = photo_jpeg(h, w)

        def ours(b):
            return prepare(b, spec)

        def theirs(b):  # what a transformers user runs: PIL decode, then the processor
            return hf(images=[Image.open(io.BytesIO(b))], size=size, return_tensors="pt")

        for fn in (ours, theirs):  # warm up: plan caches, allocator, lazy imports
            fn(data)
        t_ours, t_hf, t_dec = [], [], []
        for _ in range(args.iters // 4):  # interleaved, so that load from elsewhere hits both alike
            t_ours += timed(ours, data, 4)
            t_hf += timed(theirs, data, 4)
            t_dec += timed(decode, data, 1)  # the PIL decode both sides start with
        rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
        rows.append(dict(image=f"{w}x{h}", jpeg_bytes=len(data), max_pixels=spec.max_pixels, resized_to=f"{rw}x{rh}",
                         po_batch_ms=statistics.median(t_ours), po_batch_ms_min=min(t_ours),
                         transformers_ms=statistics.median(t_hf), transformers_ms_min=min(t_hf),
                         decode_ms=statistics.median(t_dec),
                         ratio=statistics.median(t_ours) / statistics.median(t_hf), iters=len(t_ours)))

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    now = datetime.now(timezone.utc)
    result = dict(
        bench="prep", date=now.isoformat(timespec="seconds"), host=socket.gethostname(), cpu=cpu,
        cores_visible=os.cpu_count(), threads=1, command=" ".join([sys.executable, *sys.argv]),
        checkpoint_config=str(CONFIG / "preprocessor_config.json"),
        transformers_processor=f"{type(hf).__name__} ({hf.backend})",
        versions=dict(python=platform.python_version(), numpy=np.__version__, pillow=Image.__version__,
                      torch=torch.__version__, torchvision=torchvision.__version__,
                      transformers=transformers.__version__),
        note="median CPU ms (process time) per image on one core, both from JPEG bytes; po-batch stops at uint8 "
             "pixels (the GPU normalises and patchifies), transformers goes on to normalised float32 patches",
        results=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"prep-{now:%Y-%m-%d}-{socket.gethostname()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{cpu}, 1 thread; wrote {path}")
    print(f"{'image':>10} {'max_pixels':>10} {'resized':>9} {'decode ms':>9} {'po-batch ms':>11} "
          f"{'transformers ms':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['image']:>10} {r['max_pixels']:>10} {r['resized_to']:>9} {r['decode_ms']:>9.2f} "
              f"{r['po_batch_ms']:>11.2f} {r['transformers_ms']:>15.2f} {r['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
