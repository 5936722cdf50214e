"""embed end to end on tiny random checkpoints: last, mean and span pooling against transformers' own last hidden
states of the same prompts (text-only Qwen3, Qwen2.5-VL and Qwen3-VL with images, and text rows on a vision
model), Matryoshka truncation, the output types, the prompt options (system, raw, thinking off), checkpoints
saved without an LM head, and bge-multilingual-gemma2 against its model card's code."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from rich.console import Console

from po_batch import worker
from po_batch.config import ConfigError, config_from_dict
from po_batch.models.loader import ModelError
from po_batch.spec import open_spec
from po_batch.tiny import QWEN3_TEMPLATE, build_checkpoint
from po_batch.verify import verify

TEXTS = ["a red cat on a table", "dog", "the blue boat and the green tree", "", "What shows the picture?"]
SIZES = [(40, 200), (77, 179), (114, 158), (151, 137), (188, 116)]
COSINE = 1e-4  # largest cosine distance to transformers' pooled hidden states


def picture(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["qwen3", "qwen2_5_vl", "qwen3_vl"])
def corpus(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    table = {"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS,
             "image": pa.array([picture(w, h, i) for i, (w, h) in enumerate(SIZES)], pa.binary())}
    pq.write_table(pa.table(table), root / "data.parquet", row_group_size=2)
    template = QWEN3_TEMPLATE if family == "qwen3" else None
    return family, build_checkpoint(root / "model", family, template=template), root


def config(ckpt, root, task: dict, out: str, image: bool):
    return config_from_dict({
        "model": {"path": str(ckpt), "device": "cpu"},
        "input": {"paths": [str(root / "data.parquet")], "image_column": "image" if image else None,
                  "columns": ["text"]},
        "task": task, "output": {"path": str(root / out)},
        "run": {"workers": 0, "rows_per_unit": 3, "batch_tokens": 4096}})


def run(ckpt, root, task: dict, out: str, image: bool) -> list[dict]:
    cfg = config(ckpt, root, task, out, image)
    assert worker.run(cfg) == 0
    return ds.dataset(cfg.output.path).to_table().sort_by("id").to_pylist()


class Hidden:
    """transformers' base model (AutoModel): the last hidden states (after the final norm) of a prompt rendered
    and tokenized by the checkpoint's own processor."""

    def __init__(self, ckpt, vision: bool):
        import transformers as tf

        self.model = tf.AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.proc = tf.AutoProcessor.from_pretrained(ckpt) if vision else tf.AutoTokenizer.from_pretrained(ckpt)
        self.tok = self.proc.tokenizer if vision else self.proc

    def chat(self, text: str, image: bytes | None, system: str | None, raw: bool = False) -> str:
        if raw:  # no template: the image first, then the text (the tokenizer adds its own special tokens)
            return ("<|vision_start|><|image_pad|><|vision_end|>" if image else "") + text
        content = [{"type": "image"}, {"type": "text", "text": text}] if image else text
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)

    def __call__(self, prompt: str, image: bytes | None):
        if image is None:
            inputs = self.tok([prompt], return_tensors="pt")
        else:
            inputs = self.proc(text=[prompt], images=[Image.open(io.BytesIO(image))], return_tensors="pt")
        with torch.no_grad():
            return inputs["input_ids"][0].numpy(), self.model(**inputs).last_hidden_state[0].numpy()


def pooled(ids, hidden, pooling: str, config: dict) -> np.ndarray:
    if pooling == "last":
        return hidden[-1]
    if pooling == "mean":
        return hidden.mean(0)
    start = int(np.flatnonzero(ids == config["vision_start_token_id"])[0])
    end = int(np.flatnonzero(ids == config["vision_end_token_id"])[0])
    return hidden[start:end + 1].mean(0)  # jina-embeddings-v4: from vision start to vision end, both included


def cosine_distance(a, b) -> float:
    return float(1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


CASES = [  # pooling, the task's other keys
    ("last", {"system": "Represent the user's input."}),
    ("last", {"template": "raw"}),
    ("mean", {"dim": 16, "output_dtype": "float16"}),
    ("span", {"normalize": False}),
]


@pytest.mark.parametrize("pooling,extra", CASES, ids=["last", "last-raw", "mean", "span"])
def test_embeddings_match_transformers_pooled_hidden_states(corpus, pooling, extra):
    family, ckpt, root = corpus
    vision = family.endswith("_vl")
    if pooling == "span" and not vision:
        pytest.skip("span pools an image")
    task = {"type": "embed", "prompt": "{text}", "pooling": pooling} | extra
    out = f"out-{pooling}-{extra.get('template', 'chat')}"
    rows = run(ckpt, root, task, out, vision)
    config = json.loads((ckpt / "config.json").read_text())
    ref = Hidden(ckpt, vision)
    images = pq.read_table(root / "data.parquet").column("image").to_pylist() if vision else [None] * len(TEXTS)
    width = (config.get("text_config") or config)["hidden_size"]
    dim = extra.get("dim", width)
    for row, text, image in zip(rows, TEXTS, images):
        if extra.get("template") == "raw" and not text and image is None:  # nothing to embed
            assert row["error"].startswith("empty: the row's prompt has no tokens") and row["embedding"] is None
            continue
        assert row["error"] is None and len(row["embedding"]) == dim
        prompt = ref.chat(text, image, extra.get("system"), extra.get("template") == "raw")
        want = pooled(*ref(prompt, image), pooling, config)[:dim]
        mine = np.array(row["embedding"], dtype=np.float32)
        assert cosine_distance(mine, want) <= COSINE, (family, pooling, row["id"])
        if extra.get("normalize", True):
            assert abs(np.linalg.norm(mine) - 1) < 2e-3
        else:  # the pooled state itself
            assert np.abs(mine - want).max() <= 1e-3
    arrow = {"float16": pa.float16(), "float32": pa.float32()}[extra.get("output_dtype", "float32")]
    assert ds.dataset(root / out).schema.field("embedding").type == pa.list_(arrow, dim)


def test_text_rows_on_a_vision_model_embed_as_its_queries(corpus):
    family, ckpt, root = corpus
    if not family.endswith("_vl"):
        pytest.skip("a vision model")
    rows = run(ckpt, root, {"type": "embed", "prompt": "Query: {text}"}, "queries", image=False)
    ref = Hidden(ckpt, vision=True)
    for row, text in zip(rows, TEXTS):
        want = ref(ref.chat(f"Query: {text}", None, None), None)[1][-1]
        assert cosine_distance(np.array(row["embedding"]), want) <= COSINE


def test_thinking_is_off_in_qwen3_templates_and_system_and_template_are_in_the_fingerprint(corpus):
    family, ckpt, root = corpus
    if family != "qwen3":
        pytest.skip("the Qwen3 template")
    base = {"model": {"path": str(ckpt), "device": "cpu"}, "input": {"paths": [str(root / "data.parquet")],
            "image_column": None, "columns": ["text"]}, "output": {"path": str(root / "fp")}}
    spec = lambda task: open_spec(config_from_dict(base | {"task": task}), "cpu", "float32", 0)  # noqa: E731
    chat = spec({"type": "embed", "prompt": "{text}"})
    assert chat.tokenizer.decode(chat.template.suffix).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    system = spec({"type": "embed", "prompt": "{text}", "system": "Be brief."})
    assert "<|im_start|>system\nBe brief.<|im_end|>" in system.tokenizer.decode(system.template.prefix)
    raw = spec({"type": "embed", "prompt": "{text}", "template": "raw"})
    assert raw.template.prefix == raw.template.suffix == []  # this tokenizer adds no special tokens of its own
    fps = [s.fingerprint() for s in (chat, system, raw)]
    assert fps[1]["task.system"] == "Be brief." and fps[2]["task.template"] == "raw"
    assert "task.system" not in fps[0] and "task.template" not in fps[0]  # defaults: older outputs still resume
    assert len({f["model.chat_template"] for f in fps}) == 3
    with pytest.raises(ConfigError, match=r"task\.pooling: span pools the image's tokens"):
        spec({"type": "embed", "pooling": "span"})
    with pytest.raises(ConfigError, match=r"task\.dim: 65 is more than the model's hidden size \(64\)"):
        spec({"type": "embed", "dim": 65})


def with_post_processor(ckpt, token: str, first: bool) -> None:
    """The tokenizer puts `token` before (Gemma's <bos>) or after (Qwen3-Embedding's <|endoftext|>) every text
    itself, through a TemplateProcessing, as the published tokenizers do."""
    path = ckpt / "tokenizer.json"
    tok = json.loads(path.read_text())
    tid = next(t["id"] for t in tok["added_tokens"] if t["content"] == token)
    special = lambda type_id: {"SpecialToken": {"id": token, "type_id": type_id}}  # noqa: E731
    seq = lambda name, type_id: {"Sequence": {"id": name, "type_id": type_id}}  # noqa: E731
    single, pair = [seq("A", 0)], [seq("A", 0), seq("B", 1)]
    single, pair = ([special(0)] + single, [special(0)] + pair) if first else (single + [special(0)],
                                                                               pair + [special(1)])
    tok["post_processor"] = {"type": "TemplateProcessing", "single": single, "pair": pair,
                             "special_tokens": {token: {"id": token, "ids": [tid], "tokens": [token]}}}
    path.write_text(json.dumps(tok))


def test_qwen3_embedding_layout_raw_prompt_with_the_tokenizers_eos(tmp_path):
    """Saved as Qwen3Model (no `model.` prefix, no LM head), the card's `Instruct: {task}\\nQuery:{text}` with no
    chat template and the tokenizer's own end-of-text token, pooled at that last token."""
    ckpt = build_checkpoint(tmp_path / "model", "qwen3", bare=True)
    with_post_processor(ckpt, "<|endoftext|>", first=False)
    from safetensors import safe_open
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert not any(k.startswith(("model.", "lm_head")) for k in f.keys())
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS}), tmp_path / "data.parquet")
    prompt = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:{text}"
    rows = run(ckpt, tmp_path, {"type": "embed", "prompt": prompt, "template": "raw", "dim": 32}, "out", False)
    ref = Hidden(ckpt, vision=False)
    eot = ref.tok.convert_tokens_to_ids("<|endoftext|>")
    for row, text in zip(rows, TEXTS):
        ids, hidden = ref(prompt.format(text=text), None)
        assert ids[-1] == eot
        assert cosine_distance(np.array(row["embedding"]), hidden[-1][:32]) <= COSINE
    cfg = config_from_dict({"model": {"path": str(ckpt), "device": "cpu"},
                            "input": {"paths": [str(tmp_path / "data.parquet")], "image_column": None,
                                      "columns": ["text"]},
                            "task": {"prompt": "Is it {text}?"}, "output": {"path": str(tmp_path / "yn")}})
    with pytest.raises(ModelError, match=r"the checkpoint has no LM head .* task\.type: embed needs none"):
        open_spec(cfg, "cpu", "float32", 0).load_engine()


BGE_TASK = "Given a web search query, retrieve relevant passages that answer the query."


def bge_gemma2_card(ckpt, input_texts: list[str]) -> np.ndarray:
    """bge-multilingual-gemma2's model card: the tokenizer (its own <bos>, no EOS) over the padded batch,
    AutoModel, last_token_pool, F.normalize. Eager attention: transformers' SDPA path drops Gemma2's soft-cap."""
    import transformers as tf

    def last_token_pool(last_hidden_states, attention_mask):
        left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
        if left_padding:
            return last_hidden_states[:, -1]
        sequence_lengths = attention_mask.sum(dim=1) - 1
        return last_hidden_states[torch.arange(last_hidden_states.shape[0]), sequence_lengths]

    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt)
    model = tf.AutoModel.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    batch_dict = tokenizer(input_texts, max_length=4096, padding=True, truncation=True, return_tensors="pt")
    assert (batch_dict["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        outputs = model(**batch_dict)
    embeddings = last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
    return torch.nn.functional.normalize(embeddings, p=2, dim=1).numpy()


def test_bge_multilingual_gemma2_raw_prompt_with_the_tokenizers_bos_matches_its_model_card(tmp_path):
    """Gemma2Model saved bare, the card's `<instruct>{task}\n<query>{query}` for queries and the plain text for
    documents, no chat template, the tokenizer's own BOS and no EOS, last-token pooling, L2. The prompts are
    longer than the tiny model's sliding window and its soft-caps bite (test_gemma)."""
    ckpt = build_checkpoint(tmp_path / "model", "gemma2_model")
    with_post_processor(ckpt, "<bos>", first=True)
    texts = [t for t in TEXTS if t]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), tmp_path / "data.parquet")
    prompt = f"<instruct>{BGE_TASK}\n<query>{{text}}"
    for task, inputs in [({"prompt": prompt}, [prompt.format(text=t) for t in texts]), ({"prompt": "{text}"}, texts)]:
        rows = run(ckpt, tmp_path, {"type": "embed", "template": "raw"} | task, f"out-{len(task['prompt'])}", False)
        want = bge_gemma2_card(ckpt, inputs)
        for row, w in zip(rows, want):
            assert cosine_distance(np.array(row["embedding"]), w) <= COSINE
            assert np.abs(np.array(row["embedding"]) - w).max() <= 1e-3
    console = Console(file=io.StringIO(), width=200)
    assert verify(config(ckpt, tmp_path, {"type": "embed", "template": "raw", "prompt": prompt}, "v", False), 4,
                  "cpu", "float32", console) == 0
    assert "4 row-questions compared" in console.file.getvalue() and "OK" in console.file.getvalue()


def test_qwen3_vl_embedding_layout_without_an_lm_head(tmp_path):
    ckpt = build_checkpoint(tmp_path / "model", "qwen3_vl", bare=True)
    images = [picture(w, h, i) for i, (w, h) in enumerate(SIZES)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(TEXTS))], "text": TEXTS,
                             "image": pa.array(images, pa.binary())}), tmp_path / "data.parquet")
    rows = run(ckpt, tmp_path, {"type": "embed", "system": "Represent the user's input."}, "out", True)
    ref = Hidden(ckpt, vision=True)
    for row, image in zip(rows, images):
        want = ref(ref.chat("", image, "Represent the user's input."), image)[1][-1]
        assert cosine_distance(np.array(row["embedding"]), want) <= COSINE


def test_verify_measures_embeddings_by_their_cosine_distance(corpus, monkeypatch):
    family, ckpt, root = corpus
    if family == "qwen2_5_vl":
        pytest.skip("one vision family and the text one")
    vision = family.endswith("_vl")
    cfg = config(ckpt, root, {"type": "embed", "prompt": "{text}", "pooling": "span" if vision else "mean",
                              "dim": 32, "system": "Represent the user's input."}, "verify", vision)
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 5, "cpu", "float32", console) == 0
    text = console.file.getvalue()
    assert "5 row-questions compared" in text and "0 over the tolerance" in text and "OK" in text
    from po_batch.engine import runner

    score = runner.Engine.score
    monkeypatch.setattr(runner.Engine, "score", lambda self, samples: score(self, samples) + 0.05)
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 2, "cpu", "float32", console) == 1
    assert "MISMATCH" in console.file.getvalue()
