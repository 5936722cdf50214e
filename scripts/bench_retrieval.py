"""Retrieval benchmark on a GPU: po-batch's embed and rerank tasks vs transformers in the same run, on random
weights with the published shapes and the same inputs. Embeddings: Qwen3-VL-Embedding-2B shapes (the Qwen3-VL-2B
config), 448x448 JPEGs, last-token pooling as its card does (transformers: the base model's last hidden state at
the last non-padding position, normalized). Rerank: Qwen3-Reranker-0.6B shapes, ~300-token query/document pairs,
its card's prompt (transformers: the card's tokens, left-padded, logits_to_keep=1, sigmoid of yes - no); and
bge-reranker-v2-gemma shapes (Gemma-2B), the same pairs, its card's get_inputs tokens (left-padded,
logits_to_keep=1, sigmoid of the "Yes" logit).
Reports rows/s, the ratio, MFU against the card's measured bf16 matmul rate, peak GPU memory and bf16 parity.
MFU counts the flops of each row as if run alone; where a batch runs its rows' common prefix once
(engine/batch.py), `mfu_executed` counts the flops run. A workload named name+unshared runs every prefix in full,
name+in-place reads a shared prefix's keys in place in the Triton kernel (layers/attention.py PREFIX_IN_PLACE).

    python scripts/bench_retrieval.py [--workloads embed_qwen3_vl_2b,rerank_qwen3_0_6b,rerank_bge_gemma] [--rows 512]
    python scripts/bench_retrieval.py --cpu-smoke     # tiny models on the CPU: checks the script itself
    python scripts/bench_retrieval.py --cpu --rows 16 --reps 1 --workloads rerank_qwen3_0_6b,rerank_qwen3_0_6b+unshared
"""

import argparse
import gc
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from po_batch.config import config_from_dict  # noqa: E402
from po_batch.engine import batch as batching  # noqa: E402
from po_batch.layers import attention  # noqa: E402
from po_batch.spec import open_spec  # noqa: E402
from po_batch.tasks.recipes import BGE_PROMPT, QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX, bge_ids  # noqa: E402

WORDS = "the a photo of red blue green dog cat car tree house boat person building street light shadow window".split()
SYSTEM = "Represent the user's input."  # Qwen3VLEmbedder's default instruction
WORKLOADS = {"embed_qwen3_vl_2b": "qwen3_vl_2b", "rerank_qwen3_0_6b": "qwen3_reranker_0_6b",
             "rerank_bge_gemma": "gemma_2b"}
DEVICE, DTYPE = "cuda", "bfloat16"
# name+variant: the workload with a switch set otherwise: (module, switch, (default, value))
VARIANTS = {"unshared": (batching, "SHARE_PREFIX", (batching.SHARE_PREFIX, 0)),  # every prefix run in full
            "in-place": (attention, "PREFIX_IN_PLACE", (attention.PREFIX_IN_PLACE, True))}  # no gather of a prefix


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, each: list | None = None) -> tuple[float, object]:
    """The best of `reps` timings of fn() and its last result; each timing appended to `each` where given."""
    best, out = math.inf, None
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        dt = time.perf_counter() - t
        best = min(best, dt)
        if each is not None:
            each.append(dt)
    return best, out


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else float("nan")


def reset() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def rows_for(workload: str, n: int) -> list[tuple[object, dict]]:
    rng = np.random.default_rng(1)
    if workload.startswith("embed"):
        jpegs = [benchlib.photo_jpeg(448, 448, i) for i in range(min(n, 64))]
        return [(jpegs[i % len(jpegs)], {"id": i}) for i in range(n)]
    return [(None, {"id": i, "query": " ".join(rng.choice(WORDS, 6)),
                    "doc": " ".join(rng.choice(WORDS, int(rng.integers(50, 75))))}) for i in range(n)]


def config(workload: str, ckpt: Path, budget: int = 16384):
    embed = workload.startswith("embed")
    task = ({"type": "embed", "system": SYSTEM, "pooling": "last"} if embed else
            {"type": "rerank", "query": "{query}", "document": "{doc}"})
    return config_from_dict({
        "model": {"path": str(ckpt)}, "output": {"path": "/tmp/unused"},
        "input": {"paths": ["/tmp/unused.parquet"], "image_column": "image" if embed else None,
                  "columns": [] if embed else ["query", "doc"]},
        "task": task, "run": {"batch_tokens": budget}})


def bench_pobatch(cfg, rows, reps: int) -> dict:
    spec = open_spec(cfg, DEVICE, DTYPE, workers=0)
    engine = spec.load_engine()
    samples = [spec.prep(r) for r in rows]
    t = time.perf_counter()
    engine.score(samples[:64])  # warm-up: kernels, allocator, compilation of the fused graphs
    warmup_s = time.perf_counter() - t
    engine.score(samples[:37])
    reset()
    each = []
    dt, readout = timed(lambda: engine.score(samples), reps, each)
    task = spec.tasks.tasks[""]
    values = task.scores(spec.tasks.split(readout)[""])
    out = {"rows_per_s": len(rows) / dt, "rep_s": each, "peak_gib": peak_gib(), "warmup_s": warmup_s,
           "fused": engine.fuse, "attention": engine.attention, "batch_tokens": engine.batch_tokens,
           "mean_tokens": float(np.mean([s.tokens for s in samples])),
           "shared_prefix": batching.shared_prefix(samples, engine.image_token_id),
           "weights_gib": sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2 ** 30,
           "values": values if task.head == "hidden" else task.probs(values)[:, 0], "samples": samples}
    engine = None
    reset()
    return out


def hf_embed_inputs(ckpt, rows, batch: int):
    import transformers as tf
    from PIL import Image

    proc = tf.AutoProcessor.from_pretrained(ckpt)
    proc.tokenizer.padding_side = "right"  # as Qwen3VLEmbedder
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}]}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [proc(text=[text] * len(chunk), images=[Image.open(io.BytesIO(img)).convert("RGB") for img, _ in chunk],
                 padding=True, return_tensors="pt").to(DEVICE)
            for chunk in (rows[i:i + batch] for i in range(0, len(rows), batch))]


def hf_rerank_inputs(workload: str, ckpt, rows, batch: int):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    if workload == "rerank_bge_gemma":
        ids = [bge_ids(enc, tok.bos_token_id, f["query"], f["doc"], BGE_PROMPT) for _, f in rows]
    else:
        prefix, suffix = enc(QWEN3_PREFIX), enc(QWEN3_SUFFIX)
        ids = [prefix + tok(f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {f['query']}\n<Document>: {f['doc']}")[
            "input_ids"] + suffix for _, f in rows]
    return [tok.pad({"input_ids": ids[i:i + batch]}, padding=True, return_tensors="pt").to(DEVICE)
            for i in range(0, len(ids), batch)]


def bench_hf(workload: str, ckpt, rows, batches, reps: int) -> dict:
    import transformers as tf

    embed = workload.startswith("embed")
    auto = tf.AutoModel if embed else tf.AutoModelForCausalLM
    model = auto.from_pretrained(ckpt, dtype=getattr(torch, DTYPE), attn_implementation="sdpa").to(DEVICE).eval()
    if not embed:
        tok = tf.AutoTokenizer.from_pretrained(ckpt)
        yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        if workload == "rerank_bge_gemma":  # the card's yes_loc, and no "no"
            yes, no = tok("Yes", add_special_tokens=False)["input_ids"][0], None

    def one(x):
        if embed:  # the last non-padding position (right padding), normalized
            h = model(**x).last_hidden_state
            last = x["attention_mask"].sum(1) - 1
            return torch.nn.functional.normalize(h[torch.arange(len(h), device=h.device), last].float(), dim=-1)
        logits = model(**x, logits_to_keep=1).logits[:, -1].float()
        return torch.sigmoid(logits[:, yes] - (0 if no is None else logits[:, no]))

    result, values = {}, None
    for b in batches:
        inputs = hf_embed_inputs(ckpt, rows, b) if embed else hf_rerank_inputs(workload, ckpt, rows, b)
        try:
            with torch.inference_mode():
                one(inputs[0])
                reset()
                dt, outs = timed(lambda: [one(x).cpu() for x in inputs], reps)
            result[str(b)] = {"rows_per_s": len(rows) / dt, "peak_gib": peak_gib()}
            if values is None:
                values = torch.cat(outs).numpy()
        except torch.OutOfMemoryError:
            result[str(b)] = None
        inputs = None
        reset()
    model = None
    reset()
    return {"by_batch": result, "values": values}


def parity(workload: str, ours: np.ndarray, theirs: np.ndarray) -> dict:
    if workload.startswith("embed"):
        cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
        return {"rows": len(ours), "max_cosine_distance": float((1 - cos).max()),
                "mean_cosine_distance": float((1 - cos).mean())}
    d = np.abs(ours - theirs)
    return {"rows": len(ours), "max_abs_dscore": float(d.max()), "mean_abs_dscore": float(d.mean()),
            "same_side_of_half": float(((ours > 0.5) == (theirs > 0.5)).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/po-batch-bench")
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "retrieval.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, to check the script itself")
    ap.add_argument("--cpu", action="store_true",
                    help="the published shapes on the CPU in float32 (transformers at batch 8 and 16): slow, for "
                         "A/Bs of the engine's own work where no GPU is at hand")
    args = ap.parse_args()
    global DEVICE, DTYPE
    if args.cpu_smoke or args.cpu:
        DEVICE, DTYPE = "cpu", "float32"
    if args.cpu_smoke:
        args.rows, args.reps, args.work = min(args.rows, 24), 1, args.work + "-tiny"
    record = {"env": benchlib.environment(), "workloads": {},
              "matmul_tflops": benchlib.matmul_tflops() if DEVICE == "cuda" else float("nan")}
    hf_runs = {}
    for key in args.workloads.split(","):
        name, *variants = key.split("+")
        if set(variants) - VARIANTS.keys():
            ap.error(f"{key}: the variants are {', '.join(VARIANTS)}")
        for variant, (module, switch, (default, value)) in VARIANTS.items():
            setattr(module, switch, value if variant in variants else default)
        key += f"#{sum(k.split('#')[0] == key for k in record['workloads']) + 1}" * (key in record["workloads"])
        base, _, budget = name.partition("@")  # name@N: the same workload with batch_tokens N
        ckpt = benchlib.make_checkpoint(WORKLOADS[base], Path(args.work) / WORKLOADS[base], DEVICE,
                                        tiny=args.cpu_smoke)
        rows = rows_for(base, args.rows)
        ours = bench_pobatch(config(base, ckpt, int(budget or 16384)), rows, args.reps)
        if base not in hf_runs:  # once per workload: its @N variants differ in po-batch's budget only
            batches = (4, 8) if args.cpu_smoke else (8, 16) if args.cpu else benchlib.HF_BATCHES
            hf_runs[base] = bench_hf(base, ckpt, rows, batches, args.reps)
        theirs = hf_runs[base]
        cfg_json = json.loads((ckpt / "config.json").read_text())
        flops = float(np.mean([benchlib.model_flops(cfg_json, s.tokens - (s.grid[1] * s.grid[2] // 4 if s.grid else 0),
                                                    s.grid) for s in ours["samples"]]))
        shared = ours["shared_prefix"]
        groups = len(batching.pack(ours["samples"], ours["batch_tokens"], shared))
        executed = flops - (1 - groups / len(rows)) * (benchlib.model_flops(cfg_json, shared, None) if shared else 0)
        ok = {b: r for b, r in theirs["by_batch"].items() if r}
        best_b = max(ok, key=lambda b: ok[b]["rows_per_s"])
        best = ok[best_b]["rows_per_s"]
        w = {"rows": len(rows), "flops_per_row": flops,
             "pobatch": {k: v for k, v in ours.items() if k not in ("values", "samples")},
             "transformers": theirs["by_batch"], "transformers_best_batch": int(best_b),
             "speedup_vs_best": ours["rows_per_s"] / best,
             "mfu": ours["rows_per_s"] * flops / (record["matmul_tflops"] * 1e12),
             "mfu_executed": ours["rows_per_s"] * executed / (record["matmul_tflops"] * 1e12),
             "transformers_mfu": best * flops / (record["matmul_tflops"] * 1e12),
             "parity": parity(base, ours["values"], theirs["values"])}
        record["workloads"][key] = w
        print(f"{key}: po-batch {ours['rows_per_s']:.1f} rows/s vs transformers best {best:.1f} (b={best_b}) -> "
              f"{w['speedup_vs_best']:.2f}x, peak {ours['peak_gib']:.2f} GiB, parity {w['parity']}", flush=True)
        benchlib.write_json(Path(args.out), record)  # after each workload: a time-out keeps what was measured
    print(f"\n{'workload':<20}{'po-batch/s':>12}{'hf best/s':>12}{'ratio':>8}{'MFU':>8}{'peak GiB':>10}"
          f"{'tokens':>8}  parity")
    for name, w in record["workloads"].items():
        pb = w["pobatch"]
        print(f"{name:<20}{pb['rows_per_s']:>12.1f}{w['transformers'][str(w['transformers_best_batch'])]['rows_per_s']:>12.1f}"
              f"{w['speedup_vs_best']:>8.2f}{w['mfu']:>8.1%}{pb['peak_gib']:>10.2f}{pb['mean_tokens']:>8.0f}  "
              + ", ".join(f"{k} {v:.4g}" for k, v in w["parity"].items() if k != "rows"))


if __name__ == "__main__":
    main()
