"""Shared by the benchmark scripts: random-weight checkpoints with published shapes, synthetic JPEGs, model
FLOP counts, the card's measured matmul rate, and the JSON record (card, versions, date, command)."""

import datetime
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "configs"  # the published checkpoint configs (a copy of shared/checkpoint-configs)

# Qwen3-0.6B (text) has no published config beside DESIGN.md; these are its released shapes
QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
             "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False}

# bge-reranker-v2-gemma: Gemma-2B's released shapes ("gelu" there is the tanh GELU; the LM head is tied)
GEMMA_2B = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
            "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
            "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192,
            "hidden_act": "gelu", "attention_bias": False}
# bge-multilingual-gemma2 is Gemma2-9B's decoder (an embedder: Gemma2Model); as a causal LM here, to time the decoder
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
             "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "max_position_embeddings": 8192, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
             "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
             "attention_bias": False}
TEXT_MODELS = {"qwen3_0_6b": QWEN3_06B, "gemma_2b": GEMMA_2B, "gemma2_9b": GEMMA2_9B}
# Qwen3-Reranker-0.6B: Qwen3-0.6B's shapes, its tokenizer trained on the recipe's fixed text as well (twice), so that
# the judge prompt and instruction, which every pair begins with, take 38 + 21 tokens as they take 39 + 22 with
# Qwen's own BPE (counted with its ranks, dashscope's qwen.tiktoken), rather than 92 + 55 where they are unseen text
RERANKERS = {"qwen3_reranker_0_6b": "qwen3_0_6b"}

# llava-v1.6-mistral-7b (llava-hf/llava-v1.6-mistral-7b-hf): its config.json and preprocessor config, written from the
# published key list (no copy was at hand offline)
# (tests/test_llava_next.py pins both against transformers)
LLAVA_NEXT_7B = json.loads((CONFIGS / "llava-v1.6-mistral-7b-hf" / "config.json").read_text())
LLAVA_PINPOINTS = LLAVA_NEXT_7B["image_grid_pinpoints"]

HF_BATCHES = (16, 32, 64, 128)  # transformers' best of these batch sizes is a benchmark's baseline

PUBLISHED = {"qwen3_vl_2b": "Qwen3-VL-2B-Instruct", "qwen2_vl_2b": "Qwen2-VL-2B-Instruct",
             "qwen2_5_vl_3b": "Qwen2.5-VL-3B-Instruct"}


def make_checkpoint(name: str, out: Path, device: str = "cuda", tiny: bool = False) -> Path:
    """Random bf16 weights with the published shapes, saved in HF format with a small tokenizer whose special
    tokens replace the published ids in config.json (the weights are random, so only the shapes matter).
    `tiny`: the tests' tiny model of the same family instead, to check a script on the CPU."""
    import torch
    import transformers as tf

    from po_batch import tiny as tiny_models

    if (out / "config.json").is_file():
        return out
    corpus = []
    if name in RERANKERS:
        from po_batch.tasks.recipes import QWEN3_INSTRUCTION, QWEN3_PREFIX

        name = RERANKERS[name]
        corpus = [QWEN3_PREFIX + "{}", f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {{}}", "<Document>: {}"] * 2
    if tiny:
        family = {"qwen3_vl_2b": "qwen3_vl", "qwen2_vl_2b": "qwen2_vl", "qwen2_5_vl_3b": "qwen2_5_vl",
                  "qwen3_0_6b": "qwen3", "gemma_2b": "gemma", "gemma2_9b": "gemma2", "llava_next_7b": "llava_next"}[name]
        return tiny_models.build_checkpoint(out, family)
    gemma, llava = name.startswith("gemma"), name.startswith("llava")
    if gemma:
        tok = tiny_models.build_tokenizer(0, tiny_models.GEMMA_ROLES, tiny_models.GEMMA_SPECIAL_TOKENS)
    elif llava:
        tok = tiny_models.build_tokenizer(0, tiny_models.LLAVA_ROLES, tiny_models.LLAVA_SPECIAL_TOKENS)
    else:
        tok = tiny_models.build_tokenizer(corpus=corpus)
    pre = None
    if llava:
        d = LLAVA_NEXT_7B | {"image_token_index": tok.convert_tokens_to_ids("<image>")}
        config = tf.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items()
                                                              if k not in ("architectures", "model_type")})
        cls, template = tf.AutoModelForImageTextToText, tiny_models.LLAVA_TEMPLATE
    elif name in TEXT_MODELS:
        d = TEXT_MODELS[name] | ({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                  "pad_token_id": tok.pad_token_id} if gemma else {})
        config = tf.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items()
                                                              if k not in ("architectures", "model_type")})
        cls = tf.AutoModelForCausalLM
        template = tiny_models.GEMMA_TEMPLATE if gemma else tiny_models.TEXT_TEMPLATE
    else:
        ids = tiny_models._ids(tok)
        src = CONFIGS / PUBLISHED[name]
        d = json.loads((src / "config.json").read_text())
        d.update(ids)
        d.pop("vision_token_id", None)
        config = tf.AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
        cls = tf.AutoModelForImageTextToText
        template = tiny_models.VL3_TEMPLATE if name.startswith("qwen3") else tiny_models.VL_TEMPLATE
        pre = json.loads((src / "preprocessor_config.json").read_text())
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    tok.chat_template = template
    tok.save_pretrained(out)
    if pre:
        (out / "preprocessor_config.json").write_text(json.dumps(pre))
        (out / "chat_template.jinja").write_text(template)
    if llava:
        tiny_models.write_llava_processor(out, 336, 14, LLAVA_PINPOINTS, template)
    return out


def photo_jpeg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients, blobs and noise (flat colour would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / (17 + 13 * rng.random()) + c) * np.cos(y / (23 + 7 * rng.random()))
                    for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def mixed_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """A fixed, seeded list of photo sizes: long side 320..1600 px, aspect 1:3..3:1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        long = int(rng.integers(320, 1601))
        aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        w, h = (long, max(32, int(long / aspect))) if aspect >= 1 else (max(32, int(long * aspect)), long)
        out.append((w, h))
    return out


def model_flops(config: dict, text_tokens: int, grid: tuple[int, int, int] | None,
                image_tokens: int | None = None) -> float:
    """Forward FLOPs of one sample (2 per multiply-add): every linear layer of both towers, attention's two
    matmuls (causal: half), the mergers or projector; not the LM head (one position, two rows). `image_tokens`: the
    image's tokens in the prompt where the grid does not say (LLaVA-NeXT's unpadded tiles)."""
    t = config.get("text_config", config)
    h, layers = t["hidden_size"], t["num_hidden_layers"]
    heads, kv = t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"]
    hd = t.get("head_dim") or h // heads
    v = config.get("vision_config")
    vision = 0.0
    if v and grid and config["model_type"] == "llava_next":  # CLIP over each crop, read at vision_feature_layer
        crops, n = grid[0], grid[1] * grid[2] + 1
        vd, vi = v["hidden_size"], v["intermediate_size"]
        depth = v["num_hidden_layers"] + 1 + config.get("vision_feature_layer", -2)
        per_crop = 2 * (n - 1) * 3 * v["patch_size"] ** 2 * vd + depth * (2 * n * (4 * vd * vd + 2 * vd * vi)
                                                                          + 4 * n * n * vd)
        vision = crops * per_crop + 2 * image_tokens * (vd * h + h * h)
    elif v and grid:
        n = grid[0] * grid[1] * grid[2]
        merge = v.get("spatial_merge_size", 2)
        image_tokens = n // merge ** 2
        vd = v.get("embed_dim") or v["hidden_size"]
        vi = v.get("intermediate_size") or vd * v.get("mlp_ratio", 4)
        gated = v.get("hidden_act") == "silu"  # Qwen2.5-VL's gated MLP has three matrices
        per_block = 4 * vd * vd + (3 if gated else 2) * vd * vi
        patch = v.get("patch_size", 14) ** 2 * v.get("temporal_patch_size", 2) * v.get("in_channels", v.get("in_chans", 3))
        out = v.get("out_hidden_size") or h
        g = vd * merge ** 2
        mergers = 1 + len(v.get("deepstack_visual_indexes", []))
        depth = v["depth"]
        full = v.get("fullatt_block_indexes")
        window = v.get("window_size")
        attn = 0.0
        for b in range(depth):
            span = n if full is None or b in full else min(n, (window // v["patch_size"]) ** 2)
            attn += 4 * n * span * vd
        vision = 2 * n * (patch * vd + depth * per_block) + attn + mergers * 2 * image_tokens * (g * g + g * out)
    tokens = text_tokens + (image_tokens or 0)
    per_token = h * (heads * hd + 2 * kv * hd) + heads * hd * h + 3 * h * t["intermediate_size"]
    lm = 2 * tokens * layers * per_token + layers * 2 * tokens * tokens * heads * hd  # causal: half of 4*T^2*d
    return vision + lm


def p_yes(logits: np.ndarray) -> np.ndarray:
    """P(yes) from (n, 2) yes/no logits, in float64."""
    return 1 / (1 + np.exp(logits[:, 1].astype(np.float64) - logits[:, 0]))


def same_answer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: whether two (n, 2) yes/no logit arrays give the same answer."""
    return (a[:, 0] > a[:, 1]) == (b[:, 0] > b[:, 1])


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def environment() -> dict:
    import torch
    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import flash_attn
        env["flash_attn"] = flash_attn.__version__
    except ImportError:
        env["flash_attn"] = None
    return env


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float))
    print(f"wrote {path}")
