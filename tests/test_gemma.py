"""Gemma and Gemma2 beyond the shared family tests (test_families, test_verify): the soft-caps and the sliding window
bite on the tiny Gemma2 and po-batch follows transformers' eager reference; the bare Gemma2Model (an embedder's
checkpoint: no `model.` prefix, no LM head) loads strictly and gives transformers' last hidden states; the GELU,
the embedding scale and the norm are transformers' own, bit for bit in bfloat16; the published configs build the
published shapes."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from po_batch.engine.batch import make_batch
from po_batch.engine.runner import Engine
from po_batch.layers.context import set_context
from po_batch.layers.mlp import ACTIVATIONS
from po_batch.layers.norm import GemmaRMSNorm, RMSNorm
from po_batch.models import loader
from po_batch.models.gemma import embed_scale
from po_batch.models.registry import FAMILIES, load_model, open_checkpoint
from po_batch.prep.prompt import answer_ids, build_template
from po_batch.sample import Question, Sample
from po_batch.tiny import build_checkpoint

TOL = 1e-3
PROMPT = "Document: a photo of a {thing} on the table. Is there a {thing} in this image? Answer yes or no."
THINGS = ["cat", "red dog", "blue car on a green tree", "person", "bird house"]


def prompts(model_dir):
    """The tokenizer, and per THING the samples' tokens and transformers' ids for the chat-templated prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tmpl = build_template(tok, image=False, image_token_id=None)
    samples, hf_ids = [], []
    for thing in THINGS:
        text = PROMPT.format(thing=thing)
        hf_ids.append(tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)).input_ids)
        samples.append(Sample(*tmpl.encode([Question(text)], {})))
        assert samples[-1].input_ids.tolist() == hf_ids[-1]
    return tok, samples, hf_ids


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gemma2"), "gemma2")


def test_gemma2_soft_caps_and_window_bite_and_po_batch_follows_eager_transformers(gemma2):
    from transformers import AutoModelForCausalLM

    tok, samples, hf_ids = prompts(gemma2)
    hf = AutoModelForCausalLM.from_pretrained(gemma2, dtype=torch.float32, attn_implementation="eager").eval()
    window = hf.config.sliding_window
    assert min(len(i) for i in hf_ids) > 3 * window  # every prompt is longer than the window
    assert hf.config.layer_types[-1] == "sliding_attention"  # the last layer (read rows only) has the window too
    ids = answer_ids(tok, {"yes": "yes", "no": "no", "Yes": "Yes", "No": "No"})

    def reference():
        with torch.no_grad():
            return np.stack([hf(input_ids=torch.tensor([i])).logits[0, -1, ids].numpy() for i in hf_ids])

    ref = reference()
    got = Engine(open_checkpoint(str(gemma2)), ids, "cpu", "float32", 4096).score(samples)[:, 0]
    assert np.abs(got - ref).max() <= TOL
    for layer in hf.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert np.abs(reference() - ref).max() > 100 * TOL, "the attention soft-cap does not bite"
    for layer in hf.model.layers:
        layer.self_attn.attn_logit_softcapping = hf.config.attn_logit_softcapping
    cap, hf.config.final_logit_softcapping = hf.config.final_logit_softcapping, None
    assert np.abs(reference() - ref).max() > 100 * TOL, "the final soft-cap does not bite"
    hf.config.final_logit_softcapping = cap
    hf.config.layer_types = ["full_attention"] * len(hf.config.layer_types)
    assert np.abs(reference() - ref).max() > 100 * TOL, "the sliding window does not bite"


def test_gemma2_model_loads_strictly_and_gives_transformers_last_hidden_states(tmp_path):
    """bge-multilingual-gemma2's layout: Gemma2Model, tensors without the `model.` prefix, no LM head."""
    from transformers import AutoModel

    model_dir = build_checkpoint(tmp_path, "gemma2_model")
    with safe_open(model_dir / "model.safetensors", "pt") as st:
        keys = list(st.keys())
    assert "embed_tokens.weight" in keys and not any(k.startswith(("model.", "lm_head")) for k in keys)
    _, samples, hf_ids = prompts(model_dir)
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = torch.stack([hf(input_ids=torch.tensor([i])).last_hidden_state[0, -1] for i in hf_ids])
    model = load_model(open_checkpoint(str(model_dir)), torch.float32, torch.device("cpu"))
    assert not hasattr(model, "lm_head")

    def hidden(batch_samples):
        batch = make_batch(batch_samples, None, torch.device("cpu"))
        set_context(batch.context)
        with torch.no_grad():
            return model(batch)

    packed = hidden(samples)
    assert (packed - ref).abs().max() <= TOL
    alone = torch.cat([hidden([s]) for s in samples])
    assert (alone - packed).abs().max() <= 1e-5


def test_a_checkpoint_with_a_tensor_the_model_lacks_is_refused(tmp_path):
    """Strict loading survives the prefix rename: an LM head in a Gemma2Model checkpoint is not silently dropped."""
    from safetensors.torch import load_file, save_file

    model_dir = build_checkpoint(tmp_path, "gemma2_model")
    tensors = load_file(model_dir / "model.safetensors")
    save_file(tensors | {"lm_head.weight": tensors["embed_tokens.weight"].clone()}, model_dir / "model.safetensors")
    d = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(d | {"tie_word_embeddings": False}))
    with pytest.raises(loader.ModelError, match="tensors this model does not use: 'lm_head.weight'"):
        load_model(open_checkpoint(str(model_dir)), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("family,key,value,runs", [
    ("gemma", "hidden_act", "gelu", "gelu_pytorch_tanh"),  # the published Gemma configs' "gelu" is the tanh GELU
    ("gemma", "hidden_act", "gelu_pytorch_tanh", "gelu_pytorch_tanh"),
    ("gemma2", "hidden_activation", "gelu_pytorch_tanh", "gelu_pytorch_tanh"),
    ("gemma2", "hidden_activation", "gelu", "gelu"),  # Gemma2Config takes its hidden_activation as written
])
def test_the_mlp_runs_the_gelu_transformers_reads_from_the_config(family, key, value, runs):
    import transformers as tf

    d = {"model_type": family, "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, key: value}
    config = tf.AutoConfig.for_model(**d)
    with torch.device("meta"):
        theirs = tf.AutoModelForCausalLM.from_config(config).model.layers[0].mlp.act_fn
    ours = loader.build(FAMILIES[family], d, torch.float32, torch.device("meta")).model.layers[0].mlp.act
    x = torch.linspace(-5, 5, 1001)
    assert torch.equal(ours(x), theirs(x)) and torch.equal(ours(x), ACTIVATIONS[runs](x))
    assert not torch.equal(ACTIVATIONS["gelu"](x), ACTIVATIONS["gelu_pytorch_tanh"](x))  # which one runs matters


def test_bfloat16_embedding_scale_and_norm_are_bitwise_transformers():
    """sqrt(2048) is rounded to bfloat16 (45.25) before it scales the embeddings, and the norm multiplies by
    (1 + w) in float32 before casting; either done the Qwen way would change thousands of values."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as HFNorm
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    torch.manual_seed(0)
    emb = GemmaTextScaledWordEmbedding(100, 2048, 0, embed_scale=2048 ** 0.5).bfloat16()
    emb.weight.data.normal_()
    ids = torch.arange(100)
    assert embed_scale(2048, torch.bfloat16) == 45.25
    assert torch.equal(emb.weight[ids] * embed_scale(2048, torch.bfloat16), emb(ids))
    assert (emb.weight[ids] * 2048 ** 0.5 != emb(ids)).sum() > 1000
    x, w = (torch.randn(64, 2048) * 3).bfloat16(), torch.randn(2048) * 0.5
    theirs, ours, qwen = HFNorm(2048).bfloat16(), GemmaRMSNorm(2048).bfloat16(), RMSNorm(2048).bfloat16()
    theirs.weight.data.copy_(w)
    ours.weight.data.copy_(w)
    qwen.weight.data.copy_(1 + w)
    assert torch.equal(ours(x), theirs(x))
    assert (qwen(x) != theirs(x)).sum() > 1000


# bge-reranker-v2-gemma is Gemma-2B; bge-multilingual-gemma2 is Gemma2-9B's bare decoder. Their config.json as
# published (no tie_word_embeddings, no layer_types, Gemma's legacy "gelu").
GEMMA_2B = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
            "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
            "head_dim": 256, "hidden_act": "gelu", "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 10000.0,
            "max_position_embeddings": 8192, "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0}
GEMMA2_9B = {"architectures": ["Gemma2Model"], "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584,
             "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
             "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_size": 4096,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
             "rope_theta": 10000.0, "max_position_embeddings": 8192, "attention_bias": False, "bos_token_id": 2,
             "eos_token_id": 1, "pad_token_id": 0}


@pytest.mark.parametrize("config", [GEMMA_2B, GEMMA2_9B], ids=["gemma-2b", "gemma2-9b-model"])
def test_published_configs_build_the_checkpoints_shapes(config, tmp_path):
    import transformers as tf

    (tmp_path / "config.json").write_text(json.dumps(config))
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.tie  # transformers' default for Gemma configs
    model = loader.build(ckpt.family, ckpt.config, torch.bfloat16, torch.device("meta"))
    hf_config = tf.AutoConfig.for_model(**config)
    auto = tf.AutoModel if config["architectures"] == ["Gemma2Model"] else tf.AutoModelForCausalLM
    with torch.device("meta"):
        hf = auto.from_config(hf_config)
    ours = sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")
    assert ours == sum(p.numel() for p in hf.parameters())
    layers = model.model.layers
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    assert len(layers) == config["num_hidden_layers"]
    assert layers[0].self_attn.qkv_proj.out_sizes == [heads * 256, kv * 256, kv * 256]
    if config is GEMMA2_9B:
        assert not hasattr(model, "lm_head") and ckpt.logit_softcap == 30.0
        windows = [layer.window for layer in layers]
        assert windows == [4096 if t == "sliding_attention" else None for t in hf_config.layer_types]
        assert windows[:4] == [4096, None, 4096, None]
        assert {(layer.scale, layer.softcap) for layer in layers} == {(256 ** -0.5, 50.0)}
    else:
        assert ckpt.logit_softcap is None and model.lm_head.weight.shape == (256000, 2048)
