"""LLaVA-NeXT against transformers: the image processor bit for bit (tiles, squashed crop, token count) at the published
sizes over images hitting every pinpoint; the token layout (unpadding, a newline per row) against
pack_image_features; the tiny checkpoint's logits in packed batches of mixed images and prompts, through run and verify
too; what would go unseen if wrong (the layout, Mistral's sliding window) bites; the published config builds
llava-v1.6-mistral-7b's shapes and the published weight layouts load strictly."""

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from rich.console import Console
from safetensors.torch import load_file, save_file

from po_batch import worker
from po_batch.config import ConfigError, config_from_dict
from po_batch.engine.batch import pack
from po_batch.engine.runner import Engine
from po_batch.models import loader
from po_batch.models.llava_next import LlavaNext
from po_batch.models.registry import open_checkpoint
from po_batch.prep.families import LLAVA_NEXT
from po_batch.prep.image import decode
from po_batch.prep.llava_next import LlavaNextProcessor, select_best_resolution, token_layout
from po_batch.prep.prompt import answer_ids, build_template
from po_batch.sample import Question, Sample
from po_batch.spec import open_spec
from po_batch.tiny import LLAVA_PINPOINTS, build_checkpoint, build_llama_tokenizer
from po_batch.verify import verify

TOL = 1e-3
PROMPT = "Is there a {thing} in this image? Answer yes or no."
THINGS = ["cat", "red dog", "blue car on a green tree", "person", "bird house", "boat", "tree"]
# llava-v1.6-mistral-7b's preprocessor_config.json, and its config.json as published (the text config leaves the
# hidden size and the layer and head counts to MistralConfig's defaults)
# llava-v1.6-mistral-7b-hf's published configs (written from the published key list, not a copy): the text config leaves
# the hidden size and the layer and head counts to MistralConfig's defaults (4096, 32, 32)
LLAVA_CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs" / "llava-v1.6-mistral-7b-hf"
PUBLISHED = json.loads((LLAVA_CONFIGS / "config.json").read_text())
PUBLISHED_PRE = json.loads((LLAVA_CONFIGS / "preprocessor_config.json").read_text())
PINPOINTS = PUBLISHED["image_grid_pinpoints"]


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + 1) + y, np.cos(5 * y) * x, np.sin(4 * (x + y))], -1) * 80 + 128
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def normalised(picture, proc: LlavaNextProcessor) -> torch.Tensor:
    """What the engine does on the device, as transformers does it: the uint8 patches back into (crops, 3, c, c),
    rescaled and normalised fused in float32, (x - 255 mean) / (255 std)."""
    p, s = proc.patch, proc.crop // proc.patch
    x = torch.from_numpy(picture.patches).float().view(-1, s, s, 3, p, p).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(-1, 3, s * p, s * p)
    mean, std = (torch.tensor(v).view(3, 1, 1) * (1 / 0.00392156862745098) for v in (proc.image_mean, proc.image_std))
    return (x - mean) / std


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """transformers' processor for llava-v1.6-mistral-7b's preprocessor config (and a tiny tokenizer with <image>),
    and po-batch's."""
    from transformers import AutoImageProcessor, LlavaNextProcessor as HFProcessor

    d = tmp_path_factory.mktemp("pre")
    (d / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PRE))
    image_processor = AutoImageProcessor.from_pretrained(d)
    assert type(image_processor).__name__ == "LlavaNextImageProcessor" and image_processor.backend == "torchvision"
    hf = HFProcessor(image_processor=image_processor, tokenizer=build_llama_tokenizer(),
                     patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return hf, LlavaNextProcessor.from_configs(PUBLISHED_PRE, PUBLISHED)


# (height, width): square, 1:2 and 2:1, 1:3 and 3:1, tiny, just past a tile, huge
SIZES = [(800, 800), (500, 1000), (1000, 500), (300, 1200), (1200, 300), (60, 90), (3, 3), (337, 1007), (2000, 1500)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_prep_equals_transformers_processor_at_the_published_sizes(published, fmt):
    hf, proc = published
    hit, tokens = set(), []
    for k, (h, w) in enumerate(SIZES):
        data = encode(photo(h, w, k), fmt)
        picture = proc(decode(data, proc))
        ref = hf(text="<image>", images=[ImageOps.exif_transpose(Image.open(io.BytesIO(data)))], return_tensors="pt")
        assert ref["image_sizes"][0].tolist() == [h, w]
        assert torch.equal(normalised(picture, proc), ref["pixel_values"][0]), (h, w)  # bit-identical
        assert picture.tokens == (ref["input_ids"][0] == hf.image_token_id).sum()
        assert picture.grid == (len(ref["pixel_values"][0]), 24, 24) and picture.offsets.shape == (1, picture.tokens)
        hit.add(select_best_resolution(h, w, proc.pinpoints))
        tokens.append(picture.tokens)
    assert hit == {tuple(p) for p in PINPOINTS}
    assert tokens[0] == 2928 and min(tokens) < 1200  # 672x672 unpadded; a 1:3 image keeps a third of its tiles


def test_an_rgba_png_is_composited_onto_white_as_transformers_does(published):
    hf, proc = published
    arr = photo(300, 500)
    alpha = np.tile(np.linspace(0, 255, 500).astype(np.uint8), (300, 1))
    buf = io.BytesIO()
    Image.fromarray(np.dstack([arr, alpha])).save(buf, "PNG")
    picture = proc(decode(buf.getvalue(), proc))
    ref = hf(text="<image>", images=[Image.open(io.BytesIO(buf.getvalue()))], return_tensors="pt")
    assert torch.equal(normalised(picture, proc), ref["pixel_values"][0])


def test_token_layout_is_pack_image_features_for_every_shape():
    """transformers' LlavaNextModel.pack_image_features on features that are their own patch row numbers (and a
    newline of -1) gives, token by token, the layout prep computes: at the published sizes, for sizes from 1:20 to
    20:1 and from tiny to huge."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = SimpleNamespace(image_grid_pinpoints=PINPOINTS, vision_config=SimpleNamespace(image_size=336, patch_size=14))
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in np.exp(rng.uniform(np.log(8), np.log(4000), (300, 2)))] + SIZES
    for h, w in sizes:
        bh, bw = select_best_resolution(h, w, PINPOINTS)
        crops = 1 + (bh // 336) * (bw // 336)
        features = torch.arange(crops * 576, dtype=torch.float64).view(crops, 576, 1)
        (packed,), _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [features],
                                                          torch.tensor([[h, w]]), "default", torch.tensor([-1.0]))
        assert packed[:, 0].long().tolist() == token_layout(h, w, bh // 336, bw // 336, 24).tolist(), (h, w)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = build_checkpoint(tmp_path_factory.mktemp("llava"), "llava_next")
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, hf, AutoProcessor.from_pretrained(model_dir)


# (height, width) hitting each of the tiny checkpoint's pinpoints, and a small image that ties (the first wins)
TINY_SIZES = [(60, 120), (120, 60), (200, 200), (240, 70), (70, 240), (30, 45), (130, 90)]


def tiny_case(model_dir, hf, proc, sizes=TINY_SIZES):
    """Samples of one image each and transformers' answer logits at their last position."""
    tok = proc.tokenizer
    ckpt = open_checkpoint(str(model_dir))
    images = LlavaNextProcessor.from_configs(json.loads((model_dir / "preprocessor_config.json").read_text()),
                                             ckpt.config)
    tmpl = build_template(tok, True, ckpt.image_token_id, LLAVA_NEXT)
    ids = answer_ids(tok, {"yes": "yes", "no": "no", "Yes": "Yes", "No": "No"})
    samples, ref = [], []
    for k, ((h, w), thing) in enumerate(zip(sizes, THINGS)):
        img = Image.fromarray(photo(h, w, k))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(thing=thing)}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inp = proc(text=[text], images=[img], return_tensors="pt")  # the model card's call: the tokenizer adds <s>
        with torch.no_grad():
            ref.append(hf(**inp).logits[0, -1, ids].numpy())
        picture = images(img)
        tokens = tmpl.encode([Question(PROMPT)], {"thing": thing}, picture)
        assert tokens[0].tolist() == inp["input_ids"][0].tolist() and tokens[0][0] == tok.bos_token_id
        samples.append(Sample(*tokens, picture.patches, picture.grid, layout=picture.layout))
    return ckpt, images, ids, samples, np.stack(ref)


def test_packed_batch_matches_transformers_and_each_sample_alone(tiny):
    model_dir, hf, proc = tiny
    ckpt, images, ids, samples, ref = tiny_case(*tiny)
    assert {select_best_resolution(h, w, images.pinpoints) for h, w in TINY_SIZES} == {tuple(p) for p in LLAVA_PINPOINTS}
    assert len({s.tokens for s in samples}) > 4  # mixed lengths
    engine = Engine(ckpt, ids, "cpu", "float32", 4096, images.image_mean, images.image_std)
    assert len(pack(samples, engine.batch_tokens)) == 1
    got = engine.score(samples)[:, 0]
    assert np.abs(got - ref).max() <= TOL
    alone = np.concatenate([engine.score([s]) for s in samples])[:, 0]
    np.testing.assert_allclose(alone, got, atol=1e-5, rtol=0)


def test_the_token_layout_bites(tiny):
    """The image tokens' features in another order (each image's tile grid upside down, newlines kept at the rows'
    ends) move the logits far past the tolerance: the parity above checks the layout."""
    ckpt, images, ids, samples, ref = tiny_case(*tiny)
    for s in samples:
        side = s.grid[1] * s.grid[2]
        base, grid = s.layout[:side], s.layout[side:]
        rows = len(grid) // (np.flatnonzero(grid < 0)[0] + 1)
        s.layout = np.concatenate([base, grid.reshape(rows, -1)[::-1].reshape(-1)])
    got = Engine(ckpt, ids, "cpu", "float32", 4096, images.image_mean, images.image_std).score(samples)[:, 0]
    assert np.abs(got - ref).max() > 100 * TOL


def test_mistral_sliding_window_is_transformers_and_bites(tmp_path):
    """A window shorter than the prompts (llava-v1.6-mistral's is null, but MistralConfig's default is 4096)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = build_checkpoint(tmp_path, "llava_next", text={"sliding_window": 16})
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    ckpt, images, ids, samples, ref = tiny_case(model_dir, hf, proc, TINY_SIZES[:3])
    assert min(s.tokens for s in samples) > 3 * 16
    engine = Engine(ckpt, ids, "cpu", "float32", 4096, images.image_mean, images.image_std)
    assert engine.model.model.language_model.layers[0].window == 16
    assert np.abs(engine.score(samples)[:, 0] - ref).max() <= TOL
    hf.config.text_config.sliding_window = None
    _, _, _, _, unwindowed = tiny_case(model_dir, hf, proc, TINY_SIZES[:3])
    assert np.abs(unwindowed - ref).max() > 100 * TOL
    config = json.loads((model_dir / "config.json").read_text())
    del config["text_config"]["sliding_window"]
    assert LlavaNext.from_config(config).model.language_model.layers[0].window == 4096  # MistralConfig's default


def corpus(root, model_dir, n: int = 7, **task):
    images = [encode(photo(40 + 31 * i, 230 - 27 * i, i), "PNG" if i % 2 else "JPEG") for i in range(n)]
    if n > 3:
        images[3] = b"not an image"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "category": THINGS[:n],
                             "image": pa.array(images, pa.binary())}), root / "data.parquet", row_group_size=3)
    return config_from_dict({
        "model": {"path": str(model_dir), "device": "cpu"},
        "input": {"paths": [str(root / "data.parquet")], "image_column": "image", "columns": ["category"]},
        "task": {"prompt": PROMPT.replace("{thing}", "{category}")} | task, "output": {"path": str(root / "out")},
        "run": {"workers": 0, "rows_per_unit": 4, "batch_tokens": 512}})


def test_run_in_worker_processes_equals_run_in_process_and_verify_agrees(tiny, tmp_path):
    """The processor is pickled to prep workers (which never import torch) and gives the same rows."""
    model_dir = tiny[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = corpus(tmp_path / "a", model_dir)
    assert worker.run(cfg) == 0
    pooled = corpus(tmp_path / "b", model_dir)
    pooled = pooled.model_copy(update={"run": pooled.run.model_copy(update={"workers": 2})})
    assert worker.run(pooled) == 0
    a, b = (ds.dataset(c.output.path).to_table().sort_by("id").to_pylist() for c in (cfg, pooled))
    assert a[3]["error"].startswith("not_image") and all(r["error"] is None for r in a[:3] + a[4:])
    for x, y in zip(a, b):
        assert x["error"] == y["error"] and (x["error"] or abs(x["yes_logit"] - y["yes_logit"]) <= 1e-5)
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 7, "cpu", "float32", console) == 0
    assert "6 row-questions compared" in console.file.getvalue()


def test_raw_template_places_the_image_token_and_verify_agrees(tiny, tmp_path):
    cfg = corpus(tmp_path, tiny[0], 4, template="raw")
    spec = open_spec(cfg, "cpu", "float32", 0)
    sample = spec.prep((encode(photo(50, 90), "PNG"), {"id": "x", "category": "cat"}))
    assert sample.input_ids[0] == spec.tokenizer.bos_token_id and sample.input_ids[1] == spec.ckpt.image_token_id
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 4, "cpu", "float32", console) == 0, console.file.getvalue()


def relayout(model_dir, tmp_path, rename) -> object:
    import shutil

    out = tmp_path / "relaid"
    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    save_file({rename(k): v for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return open_checkpoint(str(out))


@pytest.mark.parametrize("layout", ["published", "transformers5"])
def test_published_and_transformers_5_weight_names_load_to_the_same_logits(tiny, tmp_path, layout):
    """The published checkpoints (transformers 4.4x) keep vision_tower.vision_model.*, language_model.model.* and
    language_model.lm_head; transformers 5 holds model.vision_tower.*, model.language_model.* and lm_head."""
    import re

    ckpt, images, ids, samples, _ = tiny_case(*tiny, TINY_SIZES[:2])
    if layout == "published":
        rename = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")  # noqa: E731
    else:
        rename = lambda k: re.sub(r"^language_model\.model\.", "model.language_model.", re.sub(  # noqa: E731
            r"^language_model\.lm_head", "lm_head", re.sub(r"^(vision_tower|multi_modal_projector|image_newline)",
                                                            r"model.\1", k)))
    other = relayout(tiny[0], tmp_path, rename)
    args = ("cpu", "float32", 4096, images.image_mean, images.image_std)
    assert np.abs(Engine(other, ids, *args).score(samples) - Engine(ckpt, ids, *args).score(samples)).max() == 0


def test_a_tensor_the_model_lacks_is_refused_and_the_unread_layers_are_not_loaded(tiny, tmp_path):
    model = loader.build(LlavaNext, open_checkpoint(str(tiny[0])).config, torch.float32, torch.device("meta"))
    names = dict(model.named_parameters())
    assert len(model.model.vision_tower.encoder.layers) == 2 and not any("post_layernorm" in n for n in names)
    other = relayout(tiny[0], tmp_path, lambda k: k.replace("multi_modal_projector.linear_2", "projector.linear_2"))
    with pytest.raises(loader.ModelError, match="tensors this model does not use: 'projector.linear_2"):
        Engine(other, [1], "cpu", "float32")


def test_published_config_builds_the_checkpoints_shapes():
    """As transformers reads it: Mistral-7B (defaults for the keys left out, no window, θ 1e6), CLIP ViT-L/336 read at
    its 23rd layer (the 24th and the post-layernorm are neither built nor loaded), an untied LM head."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = loader.build(LlavaNext, PUBLISHED, torch.bfloat16, torch.device("meta"))
    lm = model.model.language_model
    assert (len(lm.layers), lm.cfg.hidden_size, lm.cfg.num_heads, lm.cfg.num_kv_heads, lm.cfg.head_dim,
            lm.cfg.intermediate_size, lm.cfg.vocab_size, lm.cfg.rope_theta, lm.cfg.rms_norm_eps, lm.cfg.qkv_bias,
            lm.cfg.sliding_window, lm.cfg.mrope_section) == (32, 4096, 32, 8, 128, 14336, 32064, 1e6, 1e-5, False,
                                                             None, None)
    tower = model.model.vision_tower
    assert len(tower.encoder.layers) == 23 and tower.cfg.side == 24 and tower.cfg.hidden_act == "quick_gelu"
    assert model.lm_head.weight.shape == (32064, 4096) and model.image_token_id == 32000
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**PUBLISHED))
    unread = sum(p.numel() for n, p in hf.named_parameters()
                 if "vision_tower" in n and (".layers.23." in n or "post_layernorm" in n))
    assert sum(p.numel() for p in model.parameters()) + unread == sum(p.numel() for p in hf.parameters())
    assert not hf.config.tie_word_embeddings and hf.config.text_config.sliding_window is None


@pytest.mark.parametrize("change,match", [
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"image_grid_pinpoints": [[56, 112]]}, "image_grid_pinpoints"),
    ({"text_config": {"model_type": "qwen2"}}, "text_config: model_type 'qwen2'"),
])
def test_configs_it_cannot_serve_are_refused_naming_the_key(tiny, tmp_path, change, match):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny[0], model_dir)
    config = json.loads((model_dir / "config.json").read_text()) | change
    (model_dir / "config.json").write_text(json.dumps(config))
    cfg = corpus(tmp_path, model_dir, 2)
    with pytest.raises(loader.ModelError, match=match):
        open_spec(cfg, "cpu", "float32", 0).load_engine()


def test_a_pixel_range_is_refused_for_a_tiling_processor(tiny, tmp_path):
    cfg = corpus(tmp_path, tiny[0], 2)
    cfg = cfg.model_copy(update={"image": cfg.image.model_copy(update={"max_pixels": 200_000})})
    with pytest.raises(ConfigError, match="image.max_pixels: llava_next"):
        open_spec(cfg, "cpu", "float32", 0)


def test_the_processor_pickles_and_its_modules_do_not_import_torch(published):
    proc = published[1]
    assert pickle.loads(pickle.dumps(proc)) == proc
    code = "import sys, po_batch.prep.families, po_batch.prep.row; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
