"""Tiny random checkpoints with the real architectures, built through transformers: for the demo and the tests.

Each is saved in HF format (config.json, model.safetensors, a small byte-level BPE tokenizer carrying
the model's special tokens, the chat template, preprocessor_config.json), so po-batch loads it exactly
as it loads a published checkpoint.
"""

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"]
QWEN_ROLES = {"unk_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
# Gemma's own tokenizer also puts <bos> before any text it tokenizes; this one does not (the chat template writes
# it), as prep/prompt.py's check that the template's parts tokenize like the whole prompt needs.
GEMMA_ROLES = {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
GEMMA_SPECIAL_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
LLAVA_SPECIAL_TOKENS = ["<image>"]

# Qwen2-VL's template (Qwen2.5-VL's is the same): a default system prompt, images as vision_start/pad/end.
VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's template has no default system prompt.
VL3_TEMPLATE = VL_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
# Gemma's (and Gemma2's): BOS first, no system turn, the assistant is "model", the user's text trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n{{ message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# llava-v1.6-mistral-7b's (chat_template.json): the images first, then the text, between [INST] and [/INST].
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]['text'] + "
    "'\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# LLaVA-NeXT's tiles, at a sixth of llava-v1.6's 336-pixel crops: (height, width) in pixels
LLAVA_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
# Text-only Qwen: content is a string.
TEXT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3's own template, cut to what po-batch renders: a system message, string content, and the thinking switch
# (enable_thinking=False renders an empty think block after the assistant's header).
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# jina-reranker-v3's special tokens (its modeling.py: doc_embed_token, query_embed_token)
JINA_V3_TOKENS = ["<|embed_token|>", "<|rerank_token|>"]

CORPUS = [
    "Is there a {} in this image? Answer yes or no.", "yes", "no", " yes", " no", "Yes", "No",
    "You are a helpful assistant.", "user", "assistant", "system", "Does the photo show a {}?",
    "Query: {} Document: a photo of a {} on the table. Is the document relevant?",
]
WORDS = ["cat", "dog", "car", "tree", "house", "person", "bird", "boat", "red", "blue", "green", "building",
         "product", "colour", "picture", "shows", "What", "Which", "matches", "query"]
# Weights 10x the usual init: with 0.02 a tiny model's logits barely move with the image or the positions, so a
# wrong M-RoPE layout or window order stayed under the parity tolerance; at 0.2 each shifts logits by > 0.1.
INIT = 0.2


def build_tokenizer(extra_first: int = 0, roles: dict = QWEN_ROLES, specials: list[str] = SPECIAL_TOKENS[1:],
                    extra_special: list[str] = (), corpus: list[str] = ()):
    """A byte-level BPE like Qwen's, trained on a few prompts; `extra_first` shifts the special-token ids; `roles`
    and `specials` are the family's special tokens (Qwen's by default), `extra_special` a model's own on top;
    `corpus`: more prompts to train on (each with a {} for a word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import Qwen2Tokenizer

    texts = [t.format(w, w) for t in CORPUS + list(corpus) for w in WORDS] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    # Pad the vocabulary so the special tokens land on non-default ids.
    for i in range(extra_first):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    qt = Qwen2Tokenizer(vocab=vocab, merges=merges, **roles)
    qt.add_special_tokens({"additional_special_tokens": list(specials) + list(extra_special)})
    return qt


def build_llama_tokenizer(extra_first: int = 0, specials: list[str] = LLAVA_SPECIAL_TOKENS):
    """A sentencepiece-style BPE like Llama's and Mistral's (LLaVA-NeXT's): "▁" for spaces, byte fallback, <s>
    added before any text, loaded by transformers' LlamaTokenizer, whose Metaspace pre-tokenizer prepends "▁" to
    the first piece of a text only: a piece's tokens depend on where it stands, unlike byte-level BPE's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    texts = [t.format(w, w) for t in CORPUS for w in WORDS] * 4 + ["[INST] ? [/INST]"] * 8
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    roles = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=roles + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    doc = json.loads(tok.to_str())["model"]
    vocab = dict(doc["vocab"])
    for i in range(extra_first):
        vocab[f"<reserved_{i}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in doc["merges"]]
    lt = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, unk_token="<unk>",
                        bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    lt.add_special_tokens({"additional_special_tokens": list(specials)})
    return lt


def _ids(tok) -> dict:
    get = tok.convert_tokens_to_ids
    return {"image_token_id": get("<|image_pad|>"), "video_token_id": get("<|video_pad|>"),
            "vision_start_token_id": get("<|vision_start|>"), "vision_end_token_id": get("<|vision_end|>")}


def build_checkpoint(path: str | Path, family: str = "qwen3_vl", seed: int = 0, tie: bool | None = None,
                     extra_first: int = 37, template: str | None = None, bare: bool = False, **overrides) -> Path:
    """Save a tiny random `family` checkpoint (qwen3_vl, qwen2_vl, qwen2_5_vl, qwen2, qwen3; gemma, gemma2 and
    gemma2_model, the bare Gemma2Model; llava_next) into `path`; or a ranking model in its published layout: jina_m0 (a
    Qwen2-VL with a score MLP, transformers 4.4x names) and jina_v3 (a Qwen3 with a projector and two special
    tokens). The LM head is tied for Gemma, untied otherwise, unless `tie` says. `template`: another chat
    template. `bare`: saved as the *Model, as embedding models are (no `model.` prefix, no LM head)."""
    import torch
    import transformers as tf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gemma = family.startswith("gemma")
    tie = gemma if tie is None else tie
    head = family if family.startswith("jina_") else None
    family = {"jina_m0": "qwen2_vl", "jina_v3": "qwen3"}.get(family, family)
    if gemma:
        tok = build_tokenizer(extra_first, GEMMA_ROLES, GEMMA_SPECIAL_TOKENS)
    elif family == "llava_next":
        tok = build_llama_tokenizer(extra_first)
    else:
        tok = build_tokenizer(extra_first, extra_special=JINA_V3_TOKENS if head == "jina_v3" else ())
    vocab = len(tok) + 3  # a little slack beyond the tokenizer, as real checkpoints have
    ids = _ids(tok)
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                max_position_embeddings=4096, tie_word_embeddings=tie, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id if gemma else None,
                initializer_range=INIT)
    text_overrides = overrides.pop("text", {})
    text.update(text_overrides)
    vision = {"initializer_range": INIT} | overrides.pop("vision", {})
    if family == "qwen3_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [3, 3, 2],
                                   "mrope_interleaved": True}
        vision = dict(depth=4, hidden_size=48, intermediate_size=80, num_heads=4, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=36,
                      deepstack_visual_indexes=[0, 2], hidden_act="gelu_pytorch_tanh") | vision
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
        model_cls, default_template, patch = tf.Qwen3VLForConditionalGeneration, VL3_TEMPLATE, 16
        mean = std = [0.5, 0.5, 0.5]
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text.pop("head_dim")
        text["hidden_size"] = 96  # head_dim 16 with 6 heads
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        if family == "qwen2_vl":
            vision = dict(depth=3, embed_dim=48, hidden_size=96, mlp_ratio=2, num_heads=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2) | vision
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
            model_cls = tf.Qwen2VLForConditionalGeneration
        else:
            vision = dict(depth=4, hidden_size=48, intermediate_size=72, num_heads=4, out_hidden_size=96,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=84,
                          fullatt_block_indexes=[1, 3], hidden_act="silu") | vision
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
            model_cls = tf.Qwen2_5_VLForConditionalGeneration
        default_template, patch = VL_TEMPLATE, 14
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    elif family in ("qwen2", "qwen3"):
        text["rope_theta"] = 1e6
        if family == "qwen2":
            text.pop("head_dim")
            text["hidden_size"] = 96
            config, model_cls = tf.Qwen2Config(**text), tf.Qwen2ForCausalLM
        else:
            config, model_cls = tf.Qwen3Config(**text), tf.Qwen3ForCausalLM
        default_template, patch = TEXT_TEMPLATE, None
    elif family == "gemma":  # Gemma-2B's layout: multi-query attention
        text |= dict(num_attention_heads=4, num_key_value_heads=1, rope_parameters={"rope_type": "default",
                     "rope_theta": 10000.0}) | text_overrides
        config, model_cls = tf.GemmaConfig(**text), tf.GemmaForCausalLM
        default_template, patch = GEMMA_TEMPLATE, None
    elif family in ("gemma2", "gemma2_model"):
        # Soft-caps small enough to bite on these weights, a window shorter than the tests' prompts, the score
        # scale off 1/sqrt(head_dim); the default layer types: sliding windows on layers 0 and 2 (the last).
        text |= dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                     "rope_theta": 10000.0}, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                     final_logit_softcapping=3.0, sliding_window=6) | text_overrides
        config = tf.Gemma2Config(**text)
        model_cls = tf.Gemma2ForCausalLM if family == "gemma2" else tf.Gemma2Model
        default_template, patch = GEMMA_TEMPLATE, None
    elif family == "llava_next":  # llava-v1.6-mistral-7b's layout: CLIP read at its next-to-last layer, Mistral
        text |= dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}) | text_overrides
        vision = dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, image_size=56, patch_size=14) | vision
        config = tf.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids(
            "<image>"), image_grid_pinpoints=LLAVA_PINPOINTS, vision_feature_layer=-2, tie_word_embeddings=tie)
        model_cls, default_template, patch = tf.LlavaNextForConditionalGeneration, LLAVA_TEMPLATE, None
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb so parity tests see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    if family == "gemma":  # as Gemma-2B's config.json: a "gelu" that means the tanh GELU, and the tie left implicit
        config_file = path / "config.json"
        d = json.loads(config_file.read_text()) | {"hidden_act": "gelu"}
        del d["tie_word_embeddings"]
        config_file.write_text(json.dumps(d, indent=2))
    if head or bare:
        _relayout(path, model, head, bare, seed)
    template = template or default_template
    tok.chat_template = template
    tok.save_pretrained(path)
    if patch:
        merge = 2
        pre = {"patch_size": patch, "temporal_patch_size": 2, "merge_size": merge, "image_mean": mean,
               "image_std": std, "min_pixels": 4 * (patch * merge) ** 2, "max_pixels": 64 * (patch * merge) ** 2,
               "image_processor_type": "Qwen2VLImageProcessor",
               "processor_class": {"qwen3_vl": "Qwen3VLProcessor", "qwen2_vl": "Qwen2VLProcessor",
                                   "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]}
        (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        (path / "chat_template.jinja").write_text(template)
    if family == "llava_next":
        write_llava_processor(path, config.vision_config.image_size, config.vision_config.patch_size,
                              LLAVA_PINPOINTS, template)
    return path


def write_llava_processor(path: Path, crop: int, patch: int, pinpoints: list, template: str) -> None:
    """llava-v1.6-mistral-7b's processor files (preprocessor_config.json, processor_config.json, the chat
    template), at the given sizes."""
    pre = {"aspect_ratio_setting": "anyres", "crop_size": {"height": crop, "width": crop}, "do_center_crop": True,
           "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_grid_pinpoints": pinpoints, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_processor_type": "LlavaNextImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
           "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 1 / 255,
           "size": {"shortest_edge": crop}}
    proc = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": patch,
            "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (path / "processor_config.json").write_text(json.dumps(proc, indent=2))
    (path / "chat_template.jinja").write_text(template)


def _relayout(path: Path, model, head: str | None, bare: bool, seed: int) -> None:
    """Rewrite the saved weights (and config.json's architectures) in the layout the checkpoint is published in."""
    import torch
    from safetensors.torch import load_file, save_file

    from po_batch.models.jina import PROJECTOR_DIM

    weights = load_file(path / "model.safetensors")
    hidden = model.config.get_text_config().hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * INIT  # noqa: E731
    if bare:
        weights = {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("lm_head.")}
        arch = {"Qwen3ForCausalLM": "Qwen3Model"}.get(type(model).__name__, type(model).__name__.replace(
            "ForConditionalGeneration", "Model"))
    elif head == "jina_m0":  # JinaVLForRanking, saved before transformers 4.52: visual.*, model.*, score.{0,2}.*
        weights = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                   for k, v in weights.items()}
        weights |= {"score.0.weight": rand(hidden, hidden), "score.0.bias": rand(hidden),
                    "score.2.weight": rand(1, hidden), "score.2.bias": rand(1)}
        arch = "JinaVLForRanking"
    else:  # JinaForRanking: the Qwen3 weights and projector.{0,2}.weight
        weights |= {"projector.0.weight": rand(hidden // 2, hidden), "projector.2.weight": rand(PROJECTOR_DIM, hidden // 2)}
        arch = "JinaForRanking"
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [arch]
    (path / "config.json").write_text(json.dumps(config, indent=2))
