"""`po-batch demo`: a tiny random Qwen3-VL, a synthetic corpus of generated images in several Parquet files (with
corrupt rows planted on purpose), its config, and a real run of the pipeline on the CPU."""

import io
import json
import os
import random
import shlex
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

CATEGORIES = ["cat", "dog", "car", "tree", "house", "boat"]
# Written first into the demo's folder: a rerun may overwrite a folder that has it, and no other.
MARKER = ".po-batch-demo"

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


class DemoError(Exception):
    """The demo's folder cannot be used."""


def claim_folder(directory: Path) -> None:
    """Make `directory` the demo's: a new or empty folder, or one an earlier demo made (the demo overwrites its
    model/, data/, out/ and config.yaml)."""
    if directory.exists() and not directory.is_dir():
        raise DemoError(f"demo: {directory} is a file; give a new or empty folder")
    if directory.is_dir() and not (directory / MARKER).is_file() and any(directory.iterdir()):
        raise DemoError(f"demo: {directory} is not empty and was not made by `po-batch demo`; "
                        f"give a new or empty folder")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by `po-batch demo`, which reruns may overwrite\n")


def shell_word(path: str | Path) -> str:
    """`path` as the shell runs it from the current folder: relative where inside it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        rel = path.relative_to(Path.cwd())
        word = str(rel) if rel.parent != Path(".") else f"./{rel}"
    except ValueError:
        word = str(path)
    return shlex.quote(word)


def po_batch_command() -> str:
    """The po-batch executable as the user can run it: the script beside this interpreter (a venv's bin/), else
    the one on PATH, else this interpreter running the module."""
    beside = Path(sys.executable).parent / "po-batch"
    if beside.is_file():
        return shell_word(beside)
    if on_path := shutil.which("po-batch"):
        return shell_word(on_path)
    return f"{shell_word(sys.executable)} -m po_batch.cli"


def run_demo(directory: Path, rows: int) -> int:
    directory = Path(directory)
    claim_folder(directory)
    from po_batch import worker
    from po_batch.config import load_config
    from po_batch.tiny import build_checkpoint

    print(f"building a tiny random Qwen3-VL checkpoint in {directory / 'model'}")
    build_checkpoint(directory / "model", "qwen3_vl", tie=True)
    print(f"writing a synthetic corpus of {rows} images to {directory / 'data'}")
    bad = build_corpus(directory / "data", rows)
    config, out, exe = directory / "config.yaml", directory / "out", po_batch_command()
    config.write_text(CONFIG)
    print(f"planted {bad} corrupt rows; running: {exe} run {shlex.quote(str(config))} --restart")
    code = worker.run(load_config(config), restart=True, config_path=str(config))
    read = f"import pyarrow.dataset as ds; print(ds.dataset({json.dumps(str(out))}).to_table().slice(0, 5).to_pylist())"
    print(f"\nread the results:\n"
          f"  {shell_word(sys.executable)} -c {shlex.quote(read)}\n"
          f"  {exe} status {shlex.quote(str(out))}\n"
          f"score it again from scratch:\n"
          f"  {exe} run {shlex.quote(str(config))} --restart")
    return code
