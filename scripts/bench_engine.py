"""Engine benchmark on a GPU: po-batch vs transformers (sdpa, eager for Gemma2; logits_to_keep=1) on random weights
with the published shapes, the same inputs, in one run on one card. Reports samples/s, MFU against the card's measured
bf16 matmul rate, peak GPU memory, and bf16 parity (max |Δ P(yes)|, answer agreement). Writes JSON.

    python scripts/bench_engine.py [--workloads qwen3_vl_2b,qwen3_vl_2b_mixed,qwen2_vl_2b,qwen2_5_vl_3b,qwen3_0_6b,
                                    gemma_2b,gemma2_9b,llava_next_7b]
"""

import argparse
import collections
import contextlib
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from po_batch.config import config_from_dict  # noqa: E402
from po_batch.engine import batch as batching  # noqa: E402
from po_batch.layers import attention, mlp, residual  # noqa: E402
from po_batch.layers import compile as fusion  # noqa: E402
from po_batch.layers import fp8 as fp8_layers  # noqa: E402
from po_batch.models import vision as towers  # noqa: E402
from po_batch.models.registry import open_checkpoint  # noqa: E402
from po_batch.spec import open_spec  # noqa: E402

VL_PROMPT = "Is there a {category} anywhere in this photo? Look carefully at every part of the image, then answer yes or no."
TEXT_PROMPT = "Query: {query}\nDocument: {doc}\nIs the document relevant to the query? Answer yes or no."
WORDS = "the a photo of red blue green dog cat car tree house boat person building street light shadow window".split()
CATEGORIES = ["cat", "dog", "car", "tree", "house", "boat", "person", "bird"]

WORKLOADS = {  # name: (checkpoint, image sizes or None, max_pixels)
    "qwen3_vl_2b": ("qwen3_vl_2b", "448", None),
    "qwen3_vl_2b_mixed": ("qwen3_vl_2b", "mixed", 1024 * 1024),
    "qwen2_vl_2b": ("qwen2_vl_2b", "448", None),
    "qwen2_5_vl_3b": ("qwen2_5_vl_3b", "448", None),
    "qwen3_0_6b": ("qwen3_0_6b", None, None),
    "gemma_2b": ("gemma_2b", None, None),    # bge-reranker-v2-gemma's shapes
    "gemma2_9b": ("gemma2_9b", None, None),  # bge-multilingual-gemma2's decoder (soft-caps, sliding windows)
    "llava_next_7b": ("llava_next_7b", "672", None),  # llava-v1.6-mistral-7b: 672x672 tiles to 2x2 crops, 2928 tokens
}


def rows_for(kind: str | None, n: int) -> list[tuple[object, dict]]:
    rng = np.random.default_rng(1)
    if kind is None:
        return [(None, {"id": i, "query": " ".join(rng.choice(WORDS, 6)),
                        "doc": " ".join(rng.choice(WORDS, int(rng.integers(110, 150))))}) for i in range(n)]
    sizes = benchlib.mixed_sizes(n) if kind == "mixed" else [(int(kind), int(kind))] * n
    jpegs = [benchlib.photo_jpeg(w, h, i % 64) for i, (w, h) in enumerate(sizes[:64])]
    return [(jpegs[i % 64] if kind != "mixed" else benchlib.photo_jpeg(*sizes[i], i),
             {"id": i, "category": CATEGORIES[i % len(CATEGORIES)]}) for i in range(n)]


DEVICE, DTYPE = "cuda", "bfloat16"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def max_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else float("nan")


def reset_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_pobatch(cfg, rows, fuse: bool | None = None, reps: int = 3, profile: bool = False,
                  host_profile: bool = False) -> dict:
    spec = open_spec(cfg, DEVICE, DTYPE, workers=0)
    engine = spec.load_engine(fuse=fuse)
    samples = [spec.prep(r) for r in rows]
    t = time.perf_counter()
    engine.score(samples[:64])  # warm-up: kernels, allocator, compilation of the fused graphs
    warmup_s = time.perf_counter() - t
    engine.score(samples[:37])  # and a second batch shape
    reset_memory()
    best, logits = math.inf, None
    for _ in range(reps):
        dt, logits = sync_time(lambda: engine.score(samples)[:, 0])
        best = min(best, dt)
    sync()
    t = time.perf_counter()
    pending = engine.launch(samples)
    queued_s = time.perf_counter() - t  # bounded by the device's once CUDA's launch queue is full: see --profile
    pending.result()
    tensors = [*engine.model.parameters(), *engine.model.buffers()]  # fp8 weights are buffers
    weights = sum(t.numel() * t.element_size() for t in tensors) + engine.head.rows.nbytes
    result = {"samples_per_s": len(samples) / best, "peak_gib": max_memory_gib(), "fused": engine.fuse,
              "weights_gib": weights / 2 ** 30, "attention": engine.attention, "batch_tokens": engine.batch_tokens,
              "warmup_s": warmup_s, "mean_tokens": float(np.mean([s.tokens for s in samples])),
              "grid": list(samples[0].grid) if samples[0].grid else None,
              "shared_prefix": batching.shared_prefix(samples, engine.image_token_id),
              "host_queue_share": queued_s / (time.perf_counter() - t)}
    if DEVICE == "cuda":
        result["host_syncs_in_launch"] = count_syncs(lambda: engine.launch(samples[:128]).result())
    if profile and DEVICE == "cuda":
        result["profile"] = profile_table(lambda: engine.score(samples[:128]))
        result["idle"] = idle_table(lambda: engine.score(samples))
    if host_profile:
        result["host_profile"] = host_table(lambda: engine.launch(samples).result())
    spec = engine = None  # released before the memory is reset
    reset_memory()
    return result | {"logits": logits, "samples": samples}


@contextlib.contextmanager
def switched(module, switch: str, value, fresh: bool = False):
    """`module.switch` set to `value` inside the block (then back); `fresh`: the fused graphs are compiled again
    before and after."""
    old = getattr(module, switch)
    setattr(module, switch, value)
    if fresh:
        fresh_graphs()
    try:
        yield
    finally:
        setattr(module, switch, old)
        if fresh:
            fresh_graphs()


def measured_with(cfg, rows, module, switch: str, value, fresh: bool = False) -> dict:
    """po-batch's numbers with `module.switch` set to `value` for this measurement (see switched)."""
    with switched(module, switch, value, fresh):
        try:
            return {k: v for k, v in bench_pobatch(cfg, rows).items() if k not in ("logits", "samples")}
        except Exception:  # a failure here must not cost the rest of the run
            return {"error": traceback.format_exc()[-3000:]}


def multi_kernel(on: bool) -> None:
    """Inductor's multi-kernel reductions on or off for the engines loaded from here on: their graphs are compiled
    again (the cache is cleared)."""
    fusion.MULTI_KERNEL = on
    fresh_graphs()


def fresh_graphs() -> None:
    """The fused graphs are compiled again for the engines loaded from here on (after a switch they read)."""
    import torch._dynamo

    fusion.FUSED.compiled.clear()
    torch._dynamo.reset()


def count_syncs(fn) -> int:
    """Host-device synchronisations while queuing work (the final .result() is the one expected)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def host_table(fn, rows: int = 25) -> list[dict]:
    """Where the host's time goes while queuing the rows (cProfile, by own time): the functions that bound a
    host-bound workload."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    out = [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_ms": tt * 1e3, "cum_ms": ct * 1e3}
           for (f, line, name), (cc, nc, tt, ct, _) in top]
    for r in out:
        print(f"  host {r['own_ms']:8.2f} ms own {r['cum_ms']:8.2f} cum {r['calls']:7d}x  {r['function'][:90]}")
    return out


def idle_table(fn, parts: int = 10, rows: int = 12) -> dict:
    """Where the device waits while fn() runs (CUDA activity only, so that tracing costs the host little): the
    wall time from fn's start, the span from its first kernel to its last, the time inside it with no kernel
    running, that idle time in each tenth of the span, and the kernels that most often started late (the idle
    time before each, summed by name)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) * 1e3
    out = {"wall_ms": wall_ms} | idle_of(sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                                                if e.device_type == DeviceType.CUDA), parts, rows)
    print(f"idle: {out['idle_ms']:.1f} ms of a {out['span_ms']:.1f} ms span ({out['idle_share']:.1%}; wall "
          f"{wall_ms:.1f} ms); by tenth {out['idle_ms_by_tenth']}")
    for r in out["late_kernels"]:
        print(f"  idle {r['idle_ms_before']:8.2f} ms before {r['name'][:90]}")
    return out


def idle_of(spans: list[tuple[float, float, str]], parts: int, rows: int) -> dict:
    """idle_table's numbers from the kernels' (start, end, name) in microseconds, sorted by start."""
    first, end = spans[0][0], spans[0][1]
    span = max(e for _, e, _ in spans) - first
    by_part, before = [0.0] * parts, collections.Counter()
    for start, stop, name in spans[1:]:
        if start > end:  # nothing ran between the last kernel's end and this one's start
            by_part[min(parts - 1, int((end - first) / span * parts))] += start - end
            before[name[:100]] += start - end
        end = max(end, stop)
    idle = sum(by_part)
    return {"span_ms": span / 1e3, "idle_ms": idle / 1e3, "idle_share": idle / span,
            "idle_ms_by_tenth": [round(x / 1e3, 2) for x in by_part],
            "late_kernels": [{"name": n, "idle_ms_before": t / 1e3} for n, t in before.most_common(rows)]}


def profile_table(fn, rows: int = 20) -> dict:
    """Device time by kernel family (GEMM, attention, fused Triton, other) and the top kernels."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels)
    # attention first: the flash and cuDNN attention kernels' names also hold "cutlass" and "sm90_"
    families = {"attention": r"flash|fmha|cudnn|attention", "gemm": r"nvjet|gemm|cutlass|xmma|sm90_",
                "fused_triton": r"^triton_", "copy": r"[Mm]emcpy|copy"}
    split = collections.Counter()
    for e in kernels:
        split[next((f for f, rx in families.items() if re.search(rx, e.key)), "other")] += e.self_device_time_total
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    print(f"profile: {total / 1e3:.1f} ms of kernel time; " +
          ", ".join(f"{f} {t / total:.1%}" for f, t in split.most_common()))
    for e in top:
        print(f"  {e.self_device_time_total / total:6.1%} {e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:80]}")
    return {"kernel_ms": total / 1e3, "share": {f: t / total for f, t in split.items()},
            "top": [{"name": e.key[:100], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top]}


def hf_inputs(ckpt_dir, rows, cfg, batch: int):
    import transformers as tf
    from PIL import Image
    import io

    vision = rows[0][0] is not None
    proc = tf.AutoProcessor.from_pretrained(ckpt_dir) if vision else tf.AutoTokenizer.from_pretrained(ckpt_dir)
    tok = proc.tokenizer if vision else proc
    tok.padding_side = "left"
    kwargs = {}
    if cfg.image.max_pixels:
        kwargs["size"] = {"shortest_edge": proc.image_processor.size["shortest_edge"], "longest_edge": cfg.image.max_pixels}
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        texts = []
        for _, fields in chunk:
            text = cfg.task.prompt.format(**fields)
            content = [{"type": "image"}, {"type": "text", "text": text}] if vision else text
            texts.append(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True))
        if vision:
            images = [Image.open(io.BytesIO(img)).convert("RGB") for img, _ in chunk]
            out.append(proc(text=texts, images=images, padding=True, return_tensors="pt", **kwargs).to(DEVICE))
        else:
            out.append(proc(texts, padding=True, return_tensors="pt").to(DEVICE))
    return out


def bench_hf(ckpt_dir, rows, cfg, token_ids, batches) -> dict:
    import transformers as tf

    vision = rows[0][0] is not None
    auto = tf.AutoModelForImageTextToText if vision else tf.AutoModelForCausalLM
    attn = open_checkpoint(str(ckpt_dir)).reference_attention  # sdpa, or eager where sdpa is not exact (Gemma2)
    model = auto.from_pretrained(ckpt_dir, dtype=getattr(torch, DTYPE), attn_implementation=attn).to(DEVICE).eval()
    result, logits = {}, None
    for b in batches:
        inputs = hf_inputs(ckpt_dir, rows, cfg, b)

        def run():
            return [model(**x, logits_to_keep=1).logits[:, -1][:, token_ids].float().cpu() for x in inputs]
        try:
            with torch.inference_mode():
                model(**inputs[0], logits_to_keep=1)
                reset_memory()
                dt, outs = sync_time(run)
            result[str(b)] = {"samples_per_s": len(rows) / dt, "peak_gib": max_memory_gib()}
            if logits is None:
                logits = torch.cat(outs).numpy()
        except torch.OutOfMemoryError:
            result[str(b)] = None
        inputs = None
        reset_memory()
    model = None
    reset_memory()
    return {"by_batch": result, "logits": logits}


def fp8_against(cfg8, rows, ours: dict, profile: bool = False) -> tuple[dict | None, dict]:
    """po-batch's fp8 run of `rows` and its numbers against po-batch bf16 (`ours`): the speed-up, the parity and
    the agreement on the rows whose bf16 margin |l_yes - l_no| exceeds 0.5."""
    try:
        r8 = bench_pobatch(cfg8, rows, profile=profile)
    except Exception as e:  # a failure here must not cost the rest of the run
        return None, {"error": f"{type(e).__name__}: {e}"}
    fp8 = {k: v for k, v in r8.items() if k not in ("logits", "samples")}
    fp8["speedup_vs_bf16"] = r8["samples_per_s"] / ours["samples_per_s"]
    fp8["parity_vs_pobatch_bf16"] = parity(r8["logits"], ours["logits"])
    clear = np.abs(ours["logits"][:, 0] - ours["logits"][:, 1]) > 0.5
    fp8["clear_margin_rows"] = int(clear.sum())
    fp8["answer_agreement_clear_margin"] = float(
        benchlib.same_answer(r8["logits"][clear], ours["logits"][clear]).mean()) if clear.any() else None
    return r8, fp8


def parity(ours: np.ndarray, theirs: np.ndarray) -> dict:
    dp = np.abs(benchlib.p_yes(ours) - benchlib.p_yes(theirs))
    return {"samples": len(ours), "max_abs_dp_yes": float(dp.max()), "mean_abs_dp_yes": float(dp.mean()),
            "max_abs_dlogit": float(np.abs(ours - theirs).max()),
            "answer_agreement": float(benchlib.same_answer(ours, theirs).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="qwen3_vl_2b,qwen3_vl_2b_mixed,qwen2_vl_2b,qwen2_5_vl_3b,qwen3_0_6b,gemma_2b")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--work", default="/tmp/po-batch-bench")
    ap.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "engine.json"))
    ap.add_argument("--eager", default="qwen3_vl_2b", help="workloads also measured without fused graphs")
    ap.add_argument("--varlen-only", default="qwen3_vl_2b", help="workloads also measured without dense attention")
    ap.add_argument("--profile", default="qwen3_vl_2b", help="workloads to profile (top device kernels)")
    ap.add_argument("--fp8", default="qwen3_vl_2b", help="workloads also measured with model.quantization: fp8")
    ap.add_argument("--flash-only", default="qwen3_0_6b",
                    help="workloads also measured with torch's flash kernel for causal attention instead of Triton")
    ap.add_argument("--repeat-kv", default="qwen3_vl_2b",
                    help="workloads also measured with K/V repeated for grouped heads (layers/attention.py)")
    ap.add_argument("--no-epilogue", default="qwen3_vl_2b",
                    help="workloads also measured without the cuBLASLt GELU epilogue (layers/mlp.py)")
    ap.add_argument("--no-multi-kernel", default="qwen3_0_6b",
                    help="workloads also measured (bf16, and fp8 where --fp8 names them) without inductor's "
                         "multi-kernel reductions (layers/compile.py)")
    ap.add_argument("--inductor-quant", default="qwen3_vl_2b",
                    help="workloads also measured in fp8 with inductor's fusion of each MLP's activation and "
                         "quantization instead of the one-pass Triton kernel (layers/triton_quant.py)")
    ap.add_argument("--no-triton-full", default="qwen3_vl_2b",
                    help="workloads also measured with the vision towers' full attention through cuDNN (same-size "
                         "images) or torch's flash kernel instead of the Triton kernel (layers/attention.py)")
    ap.add_argument("--no-in-place", default="qwen3_0_6b",
                    help="workloads also measured with the decoders' residual projections added out of place "
                         "(layers/residual.py)")
    ap.add_argument("--no-fused-ends", default="qwen3_vl_2b",
                    help="workloads also measured with the vision towers' patch embedding, position and rope tables "
                         "and mergers run eagerly (models/vision.py)")
    ap.add_argument("--div-rn", default="",
                    help="workloads also measured in fp8 with IEEE division in the one-pass quantization kernel "
                         "instead of a reciprocal and a fused multiply-add (layers/triton_quant.py)")
    ap.add_argument("--no-fast-accum", default="qwen3_vl_2b",
                    help="workloads also measured in fp8 with torch._scaled_mm's float32 accumulation instead of "
                         "the tensor cores' (layers/fp8.py)")
    ap.add_argument("--no-shared-prefix", default="",
                    help="workloads also measured with every sample's prefix run in full, not once a batch "
                         "(engine/batch.py SHARE_PREFIX)")
    ap.add_argument("--prefix-in-place", default="",
                    help="workloads also measured with a batch's shared prefix read in place by the Triton kernel "
                         "instead of gathered (layers/attention.py PREFIX_IN_PLACE)")
    ap.add_argument("--host-profile", default="", help="workloads whose queuing of the rows is profiled on the host")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, to check the script itself")
    args = ap.parse_args()
    global DEVICE, DTYPE
    if args.cpu_smoke:
        DEVICE, DTYPE = "cpu", "float32"
    record = {"env": benchlib.environment(), "workloads": {},
              "matmul_tflops": benchlib.matmul_tflops() if DEVICE == "cuda" else 1.0}
    print(f"card {record['env'].get('card')}: bf16 matmul {record['matmul_tflops']:.0f} TFLOP/s")
    hf_runs = {}
    for name in args.workloads.split(","):
        base, _, budget = name.partition("@")  # name@N: the same workload with batch_tokens N
        ckpt_name, kind, max_pixels = WORKLOADS[base]
        ckpt = benchlib.make_checkpoint(ckpt_name, Path(args.work) / ckpt_name, DEVICE, tiny=args.cpu_smoke)
        vision = kind is not None
        n = args.samples if kind != "mixed" else args.samples // 2
        cfg = config_from_dict({
            "model": {"path": str(ckpt)}, "output": {"path": "/tmp/unused"},
            "input": {"paths": ["/tmp/unused.parquet"], "image_column": "image" if vision else None,
                      "columns": ["category"] if vision else ["query", "doc"]},
            "task": {"prompt": VL_PROMPT if vision else TEXT_PROMPT},
            "image": {"max_pixels": max_pixels}, "run": {"batch_tokens": int(budget or 16384)}})
        rows = rows_for(kind, n)
        fp8 = inductor_quant = div_rn = slow_accum = None
        eager = varlen = no_epilogue = repeat_kv = flash_only = no_triton_full = no_in_place = no_fused_ends = None
        unshared = in_place_prefix = None
        if name in args.no_shared_prefix.split(","):
            unshared = measured_with(cfg, rows, batching, "SHARE_PREFIX", 0)
        if name in args.prefix_in_place.split(","):
            in_place_prefix = measured_with(cfg, rows, attention, "PREFIX_IN_PLACE", True)
        if name in args.eager.split(","):  # before/after of the fused (torch.compile) graphs, same run
            eager = {k: v for k, v in bench_pobatch(cfg, rows, fuse=False).items() if k not in ("logits", "samples")}
        if name in args.varlen_only.split(","):  # before/after of the dense attention path for same-size images
            varlen = measured_with(cfg, rows, attention, "DENSE_WHEN_UNIFORM", False)
        if name in args.flash_only.split(","):  # before/after of the Triton causal kernel
            flash_only = measured_with(cfg, rows, attention, "TRITON_CAUSAL", False)
        if name in args.no_triton_full.split(","):  # before/after of the Triton kernel's full attention
            no_triton_full = measured_with(cfg, rows, attention, "TRITON_FULL", False)
        if name in args.repeat_kv.split(","):
            repeat_kv = measured_with(cfg, rows, attention, "GQA_DIRECT", False)
        if name in args.no_epilogue.split(","):
            no_epilogue = measured_with(cfg, rows, mlp, "GELU_EPILOGUE", False)
        if name in args.no_in_place.split(","):
            no_in_place = measured_with(cfg, rows, residual, "IN_PLACE", False, fresh=True)
        if name in args.no_fused_ends.split(","):
            no_fused_ends = measured_with(cfg, rows, towers, "FUSE_ENDS", False, fresh=True)
        single = single8 = None
        if name in args.no_multi_kernel.split(","):  # first: then the default's graphs are compiled afresh too
            multi_kernel(False)
            try:
                single = {k: v for k, v in bench_pobatch(cfg, rows).items() if k not in ("logits", "samples")}
                if name in args.fp8.split(","):
                    single8 = {k: v for k, v in bench_pobatch(cfg.model_copy(update={"model": cfg.model.model_copy(
                        update={"quantization": "fp8"})}), rows).items() if k not in ("logits", "samples")}
            except Exception:  # a failure here must not cost the rest of the run
                single = {"error": traceback.format_exc()[-3000:]}
            multi_kernel(True)
            print(f"{name} without multi-kernel: {single.get('samples_per_s', single)}, fp8 "
                  f"{single8 and single8['samples_per_s']}", flush=True)
        ours = bench_pobatch(cfg, rows, profile=name in args.profile.split(","),
                             host_profile=name in args.host_profile.split(","))
        if name in args.fp8.split(","):  # the same rows with fp8 linear layers, against po-batch bf16
            cfg8 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantization": "fp8"})})
            r8, fp8 = fp8_against(cfg8, rows, ours, profile=name in args.profile.split(","))
            print(f"{name} fp8: {fp8}", flush=True)
            if name in args.no_fast_accum.split(",") and "error" not in fp8:
                with switched(fp8_layers, "FAST_ACCUM", False, fresh=True):
                    slow_accum = fp8_against(cfg8, rows, ours)[1]
                slow_accum["fast_accum_speedup"] = r8["samples_per_s"] / slow_accum.get("samples_per_s", float("nan"))
                print(f"{name} fp8 without fast accumulation: {slow_accum}", flush=True)
            if name in args.inductor_quant.split(",") and "error" not in fp8:
                with switched(fp8_layers, "TRITON_QUANT", False, fresh=True):
                    try:
                        rq = bench_pobatch(cfg8, rows, profile=name in args.profile.split(","))
                        inductor_quant = {k: v for k, v in rq.items() if k not in ("logits", "samples")}
                        inductor_quant["triton_speedup"] = r8["samples_per_s"] / rq["samples_per_s"]
                        inductor_quant["parity_vs_triton_quant"] = parity(rq["logits"], r8["logits"])
                    except Exception:
                        inductor_quant = {"error": traceback.format_exc()[-3000:]}
                print(f"{name} fp8 with inductor's quantization: {inductor_quant}", flush=True)
            if name in args.div_rn.split(",") and "error" not in fp8:
                from po_batch.layers import triton_quant

                div_rn = measured_with(cfg8, rows, triton_quant, "FMA_DIVISION", False)
                print(f"{name} fp8 with IEEE division: {div_rn.get('samples_per_s', div_rn)}", flush=True)
        if base not in hf_runs:  # once per workload: its @N variants differ in po-batch's budget only
            hf_runs[base] = bench_hf(ckpt, rows, cfg, open_spec(cfg, "cpu", "float32", 0).tasks.candidates,
                                     (4, 8) if args.cpu_smoke else benchlib.HF_BATCHES)
        theirs = hf_runs[base]
        cfg_json = json.loads((ckpt / "config.json").read_text())
        image_token = open_checkpoint(str(ckpt)).image_token_id
        image = [0 if image_token is None else int((s.input_ids == image_token).sum()) for s in ours["samples"]]
        flops = float(np.mean([benchlib.model_flops(cfg_json, s.tokens - k, s.grid, k)
                               for s, k in zip(ours["samples"], image)]))
        best_b = max((b for b, r in theirs["by_batch"].items() if r), key=lambda b: theirs["by_batch"][b]["samples_per_s"])
        best = theirs["by_batch"][best_b]["samples_per_s"]
        w = {"samples": n, "flops_per_sample": flops,
             "pobatch": {k: v for k, v in ours.items() if k not in ("logits", "samples")}, "pobatch_eager": eager,
             "pobatch_varlen_only": varlen, "pobatch_fp8": fp8, "pobatch_fp8_inductor_quant": inductor_quant,
             "pobatch_fp8_div_rn": div_rn, "pobatch_fp8_no_fast_accum": slow_accum,
             "pobatch_no_gelu_epilogue": no_epilogue,
             "pobatch_repeat_kv": repeat_kv, "pobatch_flash_only": flash_only,
             "pobatch_no_triton_full": no_triton_full, "pobatch_no_in_place": no_in_place,
             "pobatch_no_fused_ends": no_fused_ends, "pobatch_no_shared_prefix": unshared,
             "pobatch_prefix_in_place": in_place_prefix,
             "pobatch_no_multi_kernel": single, "pobatch_fp8_no_multi_kernel": single8,
             "transformers": theirs["by_batch"], "transformers_best_batch": int(best_b),
             "speedup_vs_best": ours["samples_per_s"] / best,
             "speedup_vs_b32": ours["samples_per_s"] / theirs["by_batch"]["32"]["samples_per_s"]
             if theirs["by_batch"].get("32") else None,
             "mfu": ours["samples_per_s"] * flops / (record["matmul_tflops"] * 1e12),
             "transformers_mfu": best * flops / (record["matmul_tflops"] * 1e12),
             "parity_bf16": parity(ours["logits"][:len(theirs["logits"])], theirs["logits"])}
        record["workloads"][name] = w
        print(f"{name}: po-batch {ours['samples_per_s']:.1f}/s vs transformers best {best:.1f}/s (b={best_b}) "
              f"-> {w['speedup_vs_best']:.2f}x, MFU {w['mfu']:.1%}, peak {ours['peak_gib']:.2f} GiB "
              f"(weights {ours['weights_gib']:.2f}), parity {w['parity_bf16']}", flush=True)
        benchlib.write_json(Path(args.out), record)  # after each workload: a time-out keeps what was measured
    print(f"\n{'workload':<20}{'po-batch/s':>12}{'hf best/s':>12}{'ratio':>8}{'MFU':>8}{'peak GiB':>10}"
          f"{'weights':>9}{'max dP':>9}{'agree':>7}")
    for name, w in record["workloads"].items():
        pb, hf = w["pobatch"], w["transformers"][str(w["transformers_best_batch"])]
        print(f"{name:<20}{pb['samples_per_s']:>12.1f}{hf['samples_per_s']:>12.1f}{w['speedup_vs_best']:>8.2f}"
              f"{w['mfu']:>8.1%}{pb['peak_gib']:>10.2f}{pb['weights_gib']:>9.2f}"
              f"{w['parity_bf16']['max_abs_dp_yes']:>9.4f}{w['parity_bf16']['answer_agreement']:>7.2f}")


if __name__ == "__main__":
    main()
