"""The Qwen3-VL engine against transformers on a tiny random checkpoint (float32, CPU): logits, prompts, loading."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from po_batch.engine.runner import Engine
from po_batch.models.loader import ModelError
from po_batch.models.registry import open_checkpoint
from po_batch.prep.image import prepare, smart_resize, spec_from_preprocessor_config
from po_batch.prep.prompt import PromptError, answer_ids, build_template
from po_batch.sample import Question, Sample
from po_batch.tiny import build_checkpoint

PROMPT = "Is there a {category} in this image? Answer yes or no."
# (width, height): enlarged by smart_resize, shrunk, very wide, tall, square, odd
SIZES = [(40, 50), (400, 300), (700, 60), (90, 260), (128, 128), (77, 155)]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    # untied embeddings, DeepStack after two layers, GQA 6:2, special-token ids far from Qwen's
    return build_checkpoint(tmp_path_factory.mktemp("qwen3vl"), "qwen3_vl", tie=False)


@pytest.fixture(scope="module")
def hf(ckpt_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(ckpt_dir)


def jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), (x + y) % 256], -1)
    img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def setup(ckpt_dir, processor):
    ckpt = open_checkpoint(str(ckpt_dir))
    spec = spec_from_preprocessor_config(json.loads((ckpt_dir / "preprocessor_config.json").read_text()))
    ids = answer_ids(processor.tokenizer, {"task.yes": "yes", "task.no": "no"})
    template = build_template(processor.tokenizer, True, ckpt.config["image_token_id"])
    return ckpt, spec, ids, template


def test_packed_batch_matches_transformers_and_each_sample_alone(ckpt_dir, hf):
    model, processor = hf
    ckpt, spec, ids, template = setup(ckpt_dir, processor)
    grids = []
    for w, h in SIZES:
        grids.append(smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels))
    assert grids[0][0] * grids[0][1] > 40 * 50 and grids[1][0] * grids[1][1] < 400 * 300  # enlarged, shrunk

    samples, ref = [], []
    for k, (w, h) in enumerate(SIZES):
        data = jpeg(w, h, k)
        category = ["cat", "dog", "car", "tree", "house", "boat"][k]
        picture = spec.picture(prepare(data, spec)[0])
        tokens = template.encode([Question(PROMPT)], {"category": category}, picture)
        input_ids = tokens[0]
        samples.append(Sample(*tokens, picture.patches, picture.grid))

        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(category=category)}]}],
            tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[Image.open(io.BytesIO(data))], return_tensors="pt")
        assert input_ids.tolist() == inputs["input_ids"][0].tolist()  # the prompt equals the full rendering
        assert picture.grid == tuple(inputs["image_grid_thw"][0].tolist())
        with torch.no_grad():
            ref.append(model(**inputs, logits_to_keep=1).logits[0, -1, ids].numpy())
    ref = np.stack(ref)

    engine = Engine(ckpt, ids, "cpu", "float32", batch_tokens=100_000, pixel_mean=spec.image_mean,
                    pixel_std=spec.image_std)
    packed = engine.score(samples)[:, 0]
    assert np.abs(ref).max() > 0.05, "the tiny model's logits are too small to tell bugs apart"
    assert np.abs(packed - ref).max() <= 1e-3
    for s, row in zip(samples, packed):
        assert np.abs(engine.score([s])[0, 0] - row).max() <= 1e-5
    # a budget that splits the same samples over several forwards gives the same numbers, in input order
    engine.batch_tokens = 200
    assert np.abs(engine.score(samples)[:, 0] - packed).max() <= 1e-5


def test_untied_lm_head_keeps_only_the_answer_rows(ckpt_dir, hf):
    ckpt, spec, ids, _ = setup(ckpt_dir, hf[1])
    engine = Engine(ckpt, ids, "cpu", "float32", pixel_mean=spec.image_mean, pixel_std=spec.image_std)
    assert not hasattr(engine.model, "lm_head") and engine.head.rows.shape[0] == 2


def rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return open_checkpoint(str(dst))


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.__setitem__("model.visual.blocks.0.attn.qkvv.weight", t.pop("model.visual.blocks.0.attn.qkv.weight")),
     "model.visual.blocks.0.attn.qkvv.weight"),
    (lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"), "layers.1.mlp.gate_up_proj.weight"),
    (lambda t: t.__setitem__("model.visual.extra.weight", torch.zeros(3)), "model.visual.extra.weight"),
    (lambda t: t.__setitem__("model.language_model.norm.weight", torch.zeros(5)), "model.language_model.norm.weight"),
])
def test_checkpoint_with_renamed_missing_extra_or_misshapen_tensor_is_refused(ckpt_dir, tmp_path, edit, named):
    ckpt = rewrite(ckpt_dir, tmp_path / "bad", edit)
    with pytest.raises(ModelError, match=named.replace(".", r"\.")):
        Engine(ckpt, [1, 2], "cpu", "float32", pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3)


def test_answer_word_of_two_tokens_is_refused(hf):
    tokenizer = hf[1].tokenizer
    with pytest.raises(PromptError, match=r"task\.yes: 'Yes, definitely' is \d+ tokens"):
        answer_ids(tokenizer, {"task.yes": "Yes, definitely", "task.no": "no"})


def test_pickled_weights_only_are_refused(ckpt_dir, tmp_path):
    d = tmp_path / "bin"
    shutil.copytree(ckpt_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors only"):
        Engine(open_checkpoint(str(d)), [1, 2], "cpu", "float32")


def test_hub_id_offline_fails_with_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not download 'Qwen/Qwen3-VL-2B-Instruct'.*local checkpoint"):
        open_checkpoint("Qwen/Qwen3-VL-2B-Instruct")


def test_sharded_checkpoint_loads_through_its_index(ckpt_dir, hf, tmp_path):
    """model.safetensors.index.json with several shards gives the same logits as the single file."""
    model, processor = hf
    sharded = tmp_path / "sharded"
    shutil.copytree(ckpt_dir, sharded)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ckpt, spec, ids, template = setup(ckpt_dir, processor)
    picture = spec.picture(prepare(jpeg(96, 64, 0), spec)[0])
    sample = Sample(*template.encode([Question(PROMPT)], {"category": "cat"}, picture), picture.patches, picture.grid)
    args = dict(pixel_mean=spec.image_mean, pixel_std=spec.image_std)
    one = Engine(ckpt, ids, "cpu", "float32", **args).score([sample])
    many = Engine(open_checkpoint(str(sharded)), ids, "cpu", "float32", **args).score([sample])
    assert np.abs(one - many).max() <= 1e-6


def test_image_settings_nested_in_processor_config_are_read(ckpt_dir, tmp_path):
    """transformers 5 saves a processor's image settings under `image_processor` in processor_config.json."""
    from po_batch.config import config_from_dict
    from po_batch.spec import image_spec

    cfg = config_from_dict({"model": {"path": str(ckpt_dir)}, "input": {"paths": ["in"]}, "task": {"prompt": "p"},
                            "output": {"path": "out"}})
    want = image_spec(open_checkpoint(str(ckpt_dir)), cfg)
    nested = tmp_path / "nested"
    shutil.copytree(ckpt_dir, nested)
    pre = json.loads((nested / "preprocessor_config.json").read_text())
    (nested / "preprocessor_config.json").unlink()
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": pre}))
    assert image_spec(open_checkpoint(str(nested)), cfg) == want
    (nested / "processor_config.json").unlink()
    with pytest.raises(ModelError, match="has no preprocessor_config.json"):
        image_spec(open_checkpoint(str(nested)), cfg)
