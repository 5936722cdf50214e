"""`po-batch verify`: score the first rows of the user's corpus through po-batch and through transformers' own
implementation of the same checkpoint (AutoProcessor + AutoModel), each question (and each label, when labels are
scored whole) asked separately, and compare the task's scores: logits and log-probs, embeddings by their cosine
distance to transformers' pooled hidden states, rerank scores by the model card's computation (the Jina heads
applied to transformers' hidden states)."""

import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from po_batch.config import Config, ConfigError
from po_batch.data.plan import units_of
from po_batch.data.readers import open_reader
from po_batch.data.readers.listing import list_inputs
from po_batch.models import loader
from po_batch.prep.families import family_prep
from po_batch.prep.image import decode, read_path
from po_batch.prep.pool import RowError
from po_batch.prep.prompt import render_chat
from po_batch.spec import Spec, open_spec


def first_rows(cfg: Config, n: int) -> list[tuple[object, dict]]:
    """The first n rows of the inputs, through their reader: (image, fields)."""
    reader = open_reader(cfg.input)
    rows = []
    for file in list_inputs(cfg.input.paths, extensions=reader.extensions):
        entry, _ = reader.describe(file, n)
        for unit in units_of(entry, 0):
            for batch in reader.read(unit, entry):
                rows += zip(batch.images, batch.table.to_pylist())
                if len(rows) >= n:
                    return rows[:n]
    return rows


class Transformers:
    """The Oracle of tasks/base.py over transformers' model and processor, one row (and its image) at a time."""

    def __init__(self, spec: Spec):
        import torch
        import transformers as tf

        ckpt = spec.ckpt
        if spec.tasks.head == "logits":
            auto = tf.AutoModelForImageTextToText if ckpt.is_vision else tf.AutoModelForCausalLM
        else:  # hidden states (and a head of the checkpoint's own, reimplemented by the recipe): the base model
            auto = tf.AutoModel
        self.model = auto.from_pretrained(ckpt.dir, dtype=getattr(torch, spec.dtype),
                                          attn_implementation=ckpt.reference_attention).to(spec.device).eval()
        self.proc = tf.AutoProcessor.from_pretrained(ckpt.dir) if ckpt.is_vision else spec.tokenizer
        self.spec, self.image = spec, None

    def _inputs(self, text: str, answer: str = "", raw: bool = False):
        """The row's prompt as po-batch renders it (chat template with the task's system message, thinking off;
        or raw), tokenized by transformers' processor; or with `raw`, `text` is the whole prompt."""
        task = self.spec.cfg.task
        if raw:
            prompt = text
        elif task.template == "raw":
            prompt = (family_prep(self.spec.ckpt.config["model_type"]).placeholder if self.image else "") + text
        else:
            content = [{"type": "image"}, {"type": "text", "text": text}] if self.image else text
            prompt = render_chat(self.proc, content, task.system) + answer
        # a chat template renders every token itself, except where a processor adds the tokenizer's own (its BOS)
        # to a prompt that does not begin with BOS, as ProcessorMixin.apply_chat_template does
        bos = self.proc.tokenizer.bos_token if self.spec.ckpt.is_vision else None
        special = raw or task.template == "raw" or (self.spec.ckpt.is_vision and not (bos and prompt.startswith(bos)))
        if self.image is None:
            return self.proc(text=[prompt], return_tensors="pt", add_special_tokens=special).to(self.spec.device)
        return self.proc(text=[prompt], images=[self.image], return_tensors="pt", add_special_tokens=special,
                         **self.spec.image.reference_kwargs()).to(self.spec.device)

    def _logits(self, inputs, keep: int):
        import torch

        with torch.inference_mode():
            return self.model(**inputs, logits_to_keep=keep).logits[0].float().cpu()

    def _hidden(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(**inputs, output_hidden_states=True)
        return inputs["input_ids"][0].cpu().numpy(), out.hidden_states[-1][0].float().cpu().numpy()

    def hidden(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self._hidden(self._inputs(text))

    def run(self, prompt: str, append: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        import torch

        inputs = self._inputs(prompt, raw=True)
        if append:
            extra = torch.tensor([list(append)], device=self.spec.device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
            if "mm_token_type_ids" in inputs:  # the appended tokens are text
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        return self._hidden(inputs)

    def encode(self, text: str) -> list[int]:
        tokenizer = self.proc.tokenizer if self.spec.ckpt.is_vision else self.proc
        return tokenizer(text, add_special_tokens=False).input_ids

    def last_logits_of(self, ids: list[int]) -> np.ndarray:
        import torch

        return self._logits({"input_ids": torch.tensor([ids], device=self.spec.device)}, 1)[-1].numpy()

    def lm_rows(self, ids: list[int]) -> np.ndarray:
        return self.model.get_output_embeddings().weight[ids].float().detach().cpu().numpy()

    def tensor(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        for f in loader.weight_files(self.spec.ckpt.dir):
            with safe_open(f, "pt") as st:
                if name in st.keys():
                    return st.get_tensor(name).float().numpy()
        raise KeyError(f"{self.spec.ckpt.dir}: no tensor {name!r}")

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
    # the rows in prompts as a run holds them (several per prompt for listwise reranking)
    blocks = list(spec.tasks.blocks(((None, i), row) for i, row in enumerate(rows)))
    prepped = [prep(row) for _, row in blocks]
    good = [b for b, p in enumerate(prepped) if not isinstance(p, RowError)]
    engine = spec.load_engine()
    readout = engine.score([prepped[b] for b in good]) if good else None
    del engine  # free the device for transformers' copy
    ours = spec.tasks.split(readout) if good else {}
    at, first = 0, {}  # each good block's first row in the readout
    for b in good:
        first[b], at = at, at + blocks[b][0][2]
    oracle = Transformers(spec)
    fp8 = cfg.model.quantization == "fp8"  # compared with transformers in the model's dtype, at fp8's tolerance
    table = Table(title=f"po-batch{' fp8' if fp8 else ''} vs transformers ({dtype} on {device})")
    for col in ("row", "question", "po-batch", "transformers", "|Δ score|", "|Δ prob|", "same answer"):
        table.add_column(col)
    worst, fails, agree, compared = {}, 0, 0, 0
    for b, (((_, i, n), _), p) in enumerate(zip(blocks, prepped)):
        ids = [str(rows[j][1][cfg.input.id_column]) for j in range(i, i + n)]
        if isinstance(p, RowError):
            for rid in ids:
                table.add_row(rid, "", str(p), "skipped: po-batch flags the row", "", "", "")
            continue
        image = rows[i][0]
        data = read_path(image, spec.image.max_file_bytes) if spec.image and isinstance(image, str) else image
        oracle.image = decode(data, spec.image) if spec.image else None
        values = [{k: "" if v is None else v for k, v in rows[j][1].items()} for j in range(i, i + n)]
        for name, task in spec.tasks.tasks.items():
            mine = task.scores(ours[name])[first[b]:first[b] + n]
            try:
                ref = task.reference(oracle, values)
            except Exception as e:  # transformers refuses a row po-batch takes: nothing to compare
                for rid in ids:
                    table.add_row(rid, name or "task", "", f"skipped: transformers raised {type(e).__name__}: {e}",
                                  "", "", "")
                continue
            measure, tol = task.tolerance["fp8" if fp8 else dtype]
            for rid, m, r in zip(ids, mine, ref):
                d_score = task.difference(m, r)
                d_prob = float(np.abs(task.probs(m[None]) - task.probs(r[None])).max())
                same = task.same(m, r)
                d = d_score if measure == "score" else d_prob
                worst[measure] = max(worst.get(measure, 0.0), d)
                fails += d > tol
                agree, compared = agree + same, compared + 1
                table.add_row(rid, name or "task", task.describe(m), task.describe(r), f"{d_score:.2e}",
                              f"{d_prob:.2e}", "yes" if same else "[red]no[/red]")
    console.print(table)
    ok = compared > 0 and fails == 0
    limits = ", ".join(f"max |Δ {m}| = {w:.3g}" for m, w in worst.items()) or "nothing compared"
    tols = {"/".join(f"{m} {t:g}" for m, t in [task.tolerance["fp8" if fp8 else dtype]])
            for task in spec.tasks.tasks.values()}
    console.print(f"{compared} row-questions compared: {limits}, {fails} over the tolerance ({', '.join(tols)}), "
                  f"answers agree on "
                  f"{agree}/{compared} -> [bold]{'OK' if ok else 'MISMATCH'}[/bold]")
    return 0 if ok else 1
