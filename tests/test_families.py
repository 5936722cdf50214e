"""Every family (Qwen, Gemma, Gemma2) scores exactly like transformers (float32, CPU) on a tiny random checkpoint with
the real architecture, in a packed batch of mixed image sizes or prompt lengths and one sample at a time; and each
Qwen family's config parser builds the published checkpoints' shapes from their config.json as shipped (Gemma's:
tests/test_gemma.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from po_batch.engine.batch import pack
from po_batch.engine.runner import Engine
from po_batch.models import loader
from po_batch.models.registry import FAMILIES, open_checkpoint
from po_batch.prep.image import spec_from_preprocessor_config
from po_batch.prep.prompt import answer_ids, build_template
from po_batch.sample import Question, Sample
from po_batch.tiny import build_checkpoint

TOL = 1e-3
ANSWERS = {"yes": "yes", "no": "no", "Yes": "Yes", "No": "No"}
PROMPT = "Is there a {thing} in this image? Answer yes or no."
THINGS = ["cat", "red dog", "blue car on a green tree", "person", "bird house"]
# Merged-token grids (rows, cols): none fills Qwen2.5-VL's tiny 3 x 3-token windows (84 px) evenly on both sides.
GRIDS = [(2, 5), (4, 3), (5, 7), (7, 2), (1, 4)]
VL = ["qwen2_vl", "qwen2_5_vl"]
TEXT = ["qwen2", "qwen3", "gemma", "gemma2"]
TIED = ["qwen2_vl", "qwen3", "gemma", "gemma2"]  # the others keep a separate LM head


def vl_case(model_dir: Path):
    """Samples of one image each, transformers' logits of the answer tokens at their last position, the answer
    token ids and the pixel normalisation."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok, pre = proc.tokenizer, proc.image_processor
    image_token_id = hf.config.image_token_id
    tmpl = build_template(tok, image=True, image_token_id=image_token_id)
    ids = answer_ids(tok, ANSWERS)
    p, m = pre.patch_size, pre.merge_size
    spec = spec_from_preprocessor_config(json.loads((model_dir / "preprocessor_config.json").read_text()))
    rng = np.random.default_rng(0)
    samples, ref = [], []
    for (gh, gw), thing in zip(GRIDS, THINGS):
        img = rng.integers(0, 256, (gh * p * m, gw * p * m, 3), dtype=np.uint8)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(thing=thing)}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inp = proc(text=[text], images=[Image.fromarray(img)], return_tensors="pt")
        with torch.no_grad():
            ref.append(hf(**inp).logits[0, -1, ids].numpy())
        grid = tuple(inp["image_grid_thw"][0].tolist())
        assert grid == (1, gh * m, gw * m)
        picture = spec.picture(img)
        assert picture.grid == grid
        tokens = tmpl.encode([Question(PROMPT)], {"thing": thing}, picture)
        assert tokens[0].tolist() == inp["input_ids"][0].tolist()
        samples.append(Sample(*tokens, picture.patches, picture.grid))
    return samples, np.stack(ref), ids, (pre.image_mean, pre.image_std)


def text_case(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # eager: the exact reference for every family (transformers' SDPA path drops Gemma2's score soft-cap)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tmpl = build_template(tok, image=False, image_token_id=None)
    ids = answer_ids(tok, ANSWERS)
    samples, ref = [], []
    for thing in THINGS:
        msgs = [{"role": "user", "content": PROMPT.format(thing=thing)}]
        hf_ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)).input_ids
        with torch.no_grad():
            ref.append(hf(input_ids=torch.tensor([hf_ids])).logits[0, -1, ids].numpy())
        tokens = tmpl.encode([Question(PROMPT)], {"thing": thing})
        assert tokens[0].tolist() == hf_ids
        samples.append(Sample(*tokens))
    assert len({s.tokens for s in samples}) > 2  # mixed prompt lengths
    return samples, np.stack(ref), ids, (None, None)


@pytest.fixture(scope="module", params=VL + TEXT)
def case(request, tmp_path_factory):
    family = request.param
    model_dir = build_checkpoint(tmp_path_factory.mktemp(family), family, tie=family in TIED)
    samples, ref, ids, (mean, std) = (vl_case if family in VL else text_case)(model_dir)
    engine = Engine(open_checkpoint(str(model_dir)), ids, "cpu", "float32", 4096, mean, std)
    return family, engine, samples, ref


def test_packed_batch_matches_transformers(case):
    family, engine, samples, ref = case
    assert len(pack(samples, engine.batch_tokens)) == 1  # all samples in one packed forward
    got = engine.score(samples)[:, 0]
    assert np.abs(got - ref).max() <= TOL, f"{family}: max |Δ logit| {np.abs(got - ref).max():.2e}"


def test_each_sample_alone_equals_packed(case):
    family, engine, samples, _ = case
    packed = engine.score(samples)
    alone = np.concatenate([engine.score([s]) for s in samples])
    np.testing.assert_allclose(alone, packed, atol=1e-5, rtol=0, err_msg=family)


def test_window_layout_matches_transformers():
    """Qwen2.5-VL's windows (regrouping on the device, lengths on the host) are transformers' for edge windows,
    exact multiples of the window (where transformers pads an empty window row and drops it) and several frames."""
    from transformers.vision_utils import get_vision_window_index

    from po_batch.models.qwen2_5_vl import window_lens, window_order

    grids = [(1, 4, 10), (1, 14, 4), (1, 12, 6), (2, 6, 8), (1, 2, 2)]
    order, cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=84, patch_size=14)
    dest = window_order(torch.tensor(grids), 2, 3, sum(t * h * w for t, h, w in grids) // 4)
    assert torch.equal(torch.argsort(dest), order)
    assert np.cumsum([0] + window_lens(grids, 2, 3)).tolist() == cu.tolist()


CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"  # copies of shared/checkpoint-configs
# (layers, hidden, heads, kv heads, head dim, MLP, vocab, mrope section, vision depth, vision dim, tokens out)
PUBLISHED = {
    "Qwen2-VL-2B-Instruct": (28, 1536, 12, 2, 128, 8960, 151936, [16, 24, 24], 32, 1280, 1536),
    "Qwen2.5-VL-3B-Instruct": (36, 2048, 16, 2, 128, 11008, 151936, [16, 24, 24], 32, 1280, 2048),
    "Qwen3-VL-2B-Instruct": (28, 2048, 16, 8, 128, 6144, 151936, [24, 20, 20], 24, 1024, 2048),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_builds_the_checkpoints_shapes(name):
    """The released config.json layouts (flat 4.4x, nested 4.57) parse into the published sizes, with as many
    parameters as transformers' own model of that config."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = json.loads((CONFIGS / name / "config.json").read_text())
    model = loader.build(FAMILIES[d["model_type"]], d, torch.bfloat16, torch.device("meta"))
    layers, hidden, heads, kv, head_dim, mlp, vocab, section, depth, vdim, out = PUBLISHED[name]
    lm = model.model.language_model
    assert (len(lm.layers), lm.cfg.hidden_size, lm.cfg.num_heads, lm.cfg.num_kv_heads, lm.cfg.head_dim,
            lm.cfg.intermediate_size, lm.cfg.vocab_size, lm.cfg.mrope_section) == (
        layers, hidden, heads, kv, head_dim, mlp, vocab, section)
    assert lm.layers[0].self_attn.qkv_proj.out_sizes == [heads * head_dim, kv * head_dim, kv * head_dim]
    visual = model.model.visual
    assert len(visual.blocks) == depth and visual.blocks[0].norm1.weight.shape == (vdim,)
    assert visual.merger.fc2.out_features == out and model.image_token_id == 151655
    if d["model_type"] == "qwen2_5_vl":
        assert (visual.cfg.window_side, visual.cfg.fullatt_block_indexes) == (4, [7, 15, 23, 31])
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**d))
    tied = d["tie_word_embeddings"]
    ours = sum(p.numel() for n, p in model.named_parameters() if not (tied and n == "lm_head.weight"))
    assert ours == sum(p.numel() for p in hf.parameters())
