"""`po-batch verify`: score the first rows of the user's corpus through po-batch and through transformers' own
implementation of the same checkpoint (AutoProcessor + AutoModel), and compare the answer logits."""

import math
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from po_batch.config import Config
from po_batch.data.parquet import read_unit, resolve_path
from po_batch.data.plan import Unit, cut_units, list_inputs
from po_batch.prep.image import ImageError, decode, read_path
from po_batch.prep.pool import RowError
from po_batch.scorer import open_scorer

# float32 must agree to rounding; half precisions are compared on P(yes), which is what users read
TOLERANCE = {"float32": ("logit", 1e-3), "bfloat16": ("p_yes", 0.03), "float16": ("p_yes", 0.02)}


def first_rows(cfg: Config, n: int) -> list[tuple[object, dict]]:
    inp = cfg.input
    columns = [inp.id_column, *inp.columns] + ([inp.image_column] if inp.image_column else [])
    rows = []
    for file in list_inputs(cfg.input.paths):
        for start, stop in cut_units(file, n):
            for batch in read_unit(Unit("verify", file, start, stop), columns):
                for r in batch.to_pylist():
                    image = r.pop(inp.image_column) if inp.image_column else None
                    rows.append((resolve_path(image, file) if isinstance(image, str) else image, r))
                    if len(rows) == n:
                        return rows
    return rows


def reference(scorer, rows):
    """transformers' logits for the answer tokens at the last position, one row at a time (no padding)."""
    import torch
    import transformers as tf

    ckpt, cfg = scorer.ckpt, scorer.cfg
    dtype = getattr(torch, scorer.dtype)
    auto = tf.AutoModelForImageTextToText if ckpt.is_vision else tf.AutoModelForCausalLM
    model = auto.from_pretrained(ckpt.dir, dtype=dtype, attn_implementation="sdpa").to(scorer.device).eval()
    proc = tf.AutoProcessor.from_pretrained(ckpt.dir) if ckpt.is_vision else scorer.tokenizer
    spec = scorer.prep.spec
    out = []
    for image, fields in rows:
        text = cfg.task.prompt.format(**fields)
        try:
            if ckpt.is_vision:
                img = decode(read_path(image) if isinstance(image, str) else image, spec)
                content = [{"type": "image"}, {"type": "text", "text": text}]
                prompt = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
                inputs = proc(text=[prompt], images=[img], return_tensors="pt",
                              size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels})
            else:
                prompt = proc.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
                inputs = proc([prompt], return_tensors="pt")
        except ImageError:
            out.append(None)
            continue
        with torch.inference_mode():
            logits = model(**inputs.to(scorer.device), logits_to_keep=1).logits[0, -1]
        out.append(logits[scorer.token_ids].float().cpu().numpy())
    return out


def verify(cfg: Config, n: int, device: str, dtype: str, console: Console | None = None) -> int:
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    scorer = open_scorer(cfg, device, dtype, workers=0)
    rows = first_rows(cfg, n)
    if not rows:
        console.print("no rows to verify")
        return 1
    prepped = [scorer.prep(r) for r in rows]
    good = [i for i, p in enumerate(prepped) if not isinstance(p, RowError)]
    ours = np.full((len(rows), 2), np.nan, dtype=np.float32)
    ours[good] = scorer.engine.score([prepped[i] for i in good])
    del scorer.engine  # free the device for transformers' copy
    theirs = reference(scorer, rows)
    measure, tol = TOLERANCE[dtype]
    table = Table(title=f"po-batch vs transformers ({dtype} on {device})")
    for col in ("row", "po-batch yes/no", "transformers yes/no", "|Δ logit|", "|Δ P(yes)|", "same answer"):
        table.add_column(col)
    worst, agree, compared = 0.0, 0, 0
    for (image, fields), p, mine, ref in zip(rows, prepped, ours, theirs):
        rid = str(fields[cfg.input.id_column])
        if isinstance(p, RowError) or ref is None:
            table.add_row(rid, str(p) if isinstance(p, RowError) else "-", "skipped (bad image)", "", "", "")
            continue
        d_logit = float(np.abs(mine - ref).max())
        d_p = abs(_p_yes(mine) - _p_yes(ref))
        same = (mine[0] > mine[1]) == (ref[0] > ref[1])
        worst = max(worst, d_logit if measure == "logit" else d_p)
        agree, compared = agree + same, compared + 1
        table.add_row(rid, f"{mine[0]:.4f} / {mine[1]:.4f}", f"{ref[0]:.4f} / {ref[1]:.4f}", f"{d_logit:.2e}",
                      f"{d_p:.2e}", "yes" if same else "[red]no[/red]")
    console.print(table)
    ok = compared > 0 and worst <= tol
    console.print(f"{compared} rows compared: max |Δ {measure}| = {worst:.3g} (tolerance {tol:g}), "
                  f"answers agree on {agree}/{compared} -> [bold]{'OK' if ok else 'MISMATCH'}[/bold]")
    return 0 if ok else 1


def _p_yes(logits) -> float:
    return 1.0 / (1.0 + math.exp(float(logits[1] - logits[0])))
