"""`po-batch verify`: score the first rows of the user's corpus through po-batch and through transformers' own
implementation of the same checkpoint (AutoProcessor + AutoModel), each question (and each label, when labels are
scored whole) asked separately, and compare the task's scores."""

import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from po_batch.config import Config, ConfigError
from po_batch.data.parquet import read_unit, resolve_path
from po_batch.data.plan import Unit, cut_units, list_inputs
from po_batch.prep.image import decode, read_path
from po_batch.prep.pool import RowError
from po_batch.spec import Spec, open_spec

# float32 must agree to rounding; half precisions are compared on the probabilities users read; fp8 linears
# against transformers in the model's dtype
TOLERANCE = {"float32": ("score", 1e-3), "bfloat16": ("prob", 0.03), "float16": ("prob", 0.02), "fp8": ("prob", 0.15)}


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


class Transformers:
    """The Oracle of tasks/base.py over transformers' model and processor, one row (and its image) at a time."""

    def __init__(self, spec: Spec):
        import torch
        import transformers as tf

        ckpt = spec.ckpt
        auto = tf.AutoModelForImageTextToText if ckpt.is_vision else tf.AutoModelForCausalLM
        self.model = auto.from_pretrained(ckpt.dir, dtype=getattr(torch, spec.dtype),
                                          attn_implementation="sdpa").to(spec.device).eval()
        self.proc = tf.AutoProcessor.from_pretrained(ckpt.dir) if ckpt.is_vision else spec.tokenizer
        self.spec, self.image = spec, None

    def _inputs(self, text: str, answer: str = ""):
        content = [{"type": "image"}, {"type": "text", "text": text}] if self.image else text
        prompt = self.proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True) + answer
        if self.image is None:
            return self.proc([prompt], return_tensors="pt").to(self.spec.device)
        spec = self.spec.image
        return self.proc(text=[prompt], images=[self.image], return_tensors="pt",
                         size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}).to(self.spec.device)

    def _logits(self, inputs, keep: int):
        import torch

        with torch.inference_mode():
            return self.model(**inputs, logits_to_keep=keep).logits[0].float().cpu()

    def last_logits(self, text: str) -> np.ndarray:
        return self._logits(self._inputs(text), 1)[-1].numpy()

    def logprob(self, text: str, answer: str) -> float:
        prompt, full = self._inputs(text)["input_ids"][0], self._inputs(text, answer)
        ids = full["input_ids"][0]
        n = len(ids) - len(prompt)
        if n < 1 or not (ids[:len(prompt)] == prompt).all():
            raise ValueError(f"transformers tokenizes the prompt differently once {answer!r} follows it")
        logp = self._logits(full, n + 1)[:-1].log_softmax(-1)  # row j predicts the answer's token j
        return float(logp.gather(1, ids[-n:, None].cpu()).sum())


def verify(cfg: Config, n: int, device: str, dtype: str, console: Console | None = None) -> int:
    if n < 1:
        raise ConfigError(f"--rows: must be at least 1 (got {n})")
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    spec = open_spec(cfg, device, dtype, workers=0)
    rows = first_rows(cfg, n)
    if not rows:
        console.print("no rows to verify")
        return 1
    prep = spec.prep
    prepped = [prep(r) for r in rows]
    good = [i for i, p in enumerate(prepped) if not isinstance(p, RowError)]
    engine = spec.load_engine()
    readout = engine.score([prepped[i] for i in good]) if good else None
    del engine  # free the device for transformers' copy
    ours = spec.tasks.split(readout) if good else {}
    oracle = Transformers(spec)
    fp8 = cfg.model.quantization == "fp8"
    measure, tol = TOLERANCE["fp8" if fp8 else dtype]
    table = Table(title=f"po-batch{' fp8' if fp8 else ''} vs transformers ({dtype} on {device})")
    for col in ("row", "question", "po-batch", "transformers", "|Δ score|", "|Δ prob|", "same answer"):
        table.add_column(col)
    worst, agree, compared = 0.0, 0, 0
    for i, ((image, fields), p) in enumerate(zip(rows, prepped)):
        rid = str(fields[cfg.input.id_column])
        if isinstance(p, RowError):
            table.add_row(rid, "", str(p), "skipped: po-batch flags the row", "", "", "")
            continue
        oracle.image = decode(read_path(image) if isinstance(image, str) else image, spec.image) if spec.image else None
        values = {k: "" if v is None else v for k, v in fields.items()}
        for name, task in spec.tasks.tasks.items():
            mine = task.scores(ours[name])[good.index(i)]
            try:
                ref = task.reference(oracle, task.question.text.format_map(values))
            except Exception as e:  # transformers refuses a row po-batch takes: nothing to compare
                table.add_row(rid, name or "task", "", f"skipped: transformers raised {type(e).__name__}: {e}", "", "", "")
                continue
            p_mine, p_ref = task.probs(mine[None])[0], task.probs(ref[None])[0]
            d_score, d_prob = float(np.abs(mine - ref).max()), float(np.abs(p_mine - p_ref).max())
            same = p_mine.argmax() == p_ref.argmax()
            worst = max(worst, d_score if measure == "score" else d_prob)
            agree, compared = agree + same, compared + 1
            table.add_row(rid, name or "task", _answer(task, p_mine), _answer(task, p_ref), f"{d_score:.2e}", f"{d_prob:.2e}",
                          "yes" if same else "[red]no[/red]")
    console.print(table)
    ok = compared > 0 and worst <= tol
    console.print(f"{compared} row-questions compared: max |Δ {measure}| = {worst:.3g} (tolerance {tol:g}), "
                  f"answers agree on {agree}/{compared} -> [bold]{'OK' if ok else 'MISMATCH'}[/bold]")
    return 0 if ok else 1


def _answer(task, probs: np.ndarray) -> str:
    best = int(probs.argmax())
    return f"{task.answers[best]} {probs[best]:.4f}"
