"""`po-batch demo`: a tiny random Qwen3-VL, a synthetic corpus of generated images in several Parquet files (with
corrupt rows planted on purpose), its config, and a real run of the pipeline on the CPU."""

import io
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

CATEGORIES = ["cat", "dog", "car", "tree", "house", "boat"]

CONFIG = """\
# The demo's run: a tiny random Qwen3-VL on the CPU. See configs/example.yaml for a real one.
model:
  path: model
  dtype: auto
  device: auto
input:
  paths: [data/*.parquet]
  id_column: id
  image_column: image
  columns: [category]
task:
  type: yes_no
  prompt: "Is there a {category} in this image? Answer yes or no."
  yes: yes
  no: no
image:
  min_pixels: 4096
  max_pixels: 65536
output:
  path: out
run:
  batch_tokens: 4096
  workers: auto
  rows_per_unit: 250
"""


def synthetic_image(rng: random.Random, fmt: str) -> bytes:
    w, h = rng.randint(48, 320), rng.randint(48, 320)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 8)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randint(5, w), y0 + rng.randint(5, h))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=85) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def planted(rng: random.Random, kind: str) -> bytes:
    """Rows that must come out with an error, not stop the run."""
    if kind == "empty":
        return b""
    if kind == "not_image":
        return b"<html>this is not an image</html>"
    good = synthetic_image(rng, "JPEG")
    return good[: len(good) // 2]  # truncated


def build_corpus(data: Path, rows: int, files: int = 4, seed: int = 0) -> int:
    rng = random.Random(seed)
    data.mkdir(parents=True, exist_ok=True)
    bad = 0
    per_file = -(-rows // files)
    for f in range(files):
        ids, images, cats = [], [], []
        for i in range(f * per_file, min(rows, (f + 1) * per_file)):
            if i % 97 == 13:
                images.append(planted(rng, ["empty", "not_image", "truncated"][bad % 3]))
                bad += 1
            else:
                images.append(synthetic_image(rng, "PNG" if i % 5 == 0 else "JPEG"))
            ids.append(f"img-{i:06d}")
            cats.append(rng.choice(CATEGORIES))
        table = pa.table({"id": ids, "image": pa.array(images, pa.binary()), "category": cats})
        pq.write_table(table, data / f"part-{f:02d}.parquet", row_group_size=100)
    return bad


def run_demo(directory: Path, rows: int) -> int:
    from po_batch import pipeline
    from po_batch.config import load_config
    from po_batch.tiny import build_checkpoint

    directory = Path(directory)
    print(f"building a tiny random Qwen3-VL checkpoint in {directory / 'model'}")
    build_checkpoint(directory / "model", "qwen3_vl", tie=True)
    print(f"writing a synthetic corpus of {rows} images to {directory / 'data'}")
    bad = build_corpus(directory / "data", rows)
    (directory / "config.yaml").write_text(CONFIG)
    print(f"planted {bad} corrupt rows; running: po-batch run {directory / 'config.yaml'}")
    code = pipeline.run(load_config(directory / "config.yaml"), restart=True)
    out = directory / "out"
    print(f"\nread the results:\n  {sys.executable} -c \"import pyarrow.dataset as ds; "
          f"print(ds.dataset('{out}').to_table().slice(0, 5).to_pylist())\"\n"
          f"  po-batch status {out}")
    return code
