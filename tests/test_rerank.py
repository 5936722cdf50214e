"""rerank end to end on tiny random checkpoints, each recipe against a reference written here from its model card's
code: transformers runs the backbone, the Jina heads are reimplemented on its hidden states. Qwen3-Reranker (text),
Qwen3-VL-Reranker (image and text documents), jina-reranker-m0 (image and text documents), jina-reranker-v3
(listwise: several documents of a query in one prompt, blocks cut by query, by `task.block` and by unit) and
bge-reranker-v2-gemma (its pieces tokenized apart, its truncation)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import transformers as tf
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from po_batch import worker
from po_batch.config import ConfigError, config_from_dict
from po_batch.models.loader import ModelError
from po_batch.spec import open_spec
from po_batch.tiny import QWEN3_TEMPLATE, build_checkpoint
from po_batch.verify import verify

QUERIES = ["cat", "cat", "cat", "dog", "dog", "red car", "red car", "red car", "red car", "red car", "tree", "cat"]
DOCS = ["a photo of a cat", "a dog on the table", "", "the blue boat", "What shows the picture? A dog.",
        "a red car", "a green tree", "<|embed_token|>a house", "red", "blue building", "a tree", "a bird"]
TOL = 1e-3


def picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (int(rng.integers(40, 160)), int(rng.integers(40, 160)), 3),
                                 dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def corpus(root, images: bool = False):
    table = {"id": [f"r{i:02d}" for i in range(len(QUERIES))], "query": QUERIES, "doc": DOCS}
    if images:
        table["image"] = pa.array([picture(i) for i in range(len(QUERIES))], pa.binary())
    pq.write_table(pa.table(table), root / "data.parquet", row_group_size=4)  # units of 4 rows cut at groups


def run(ckpt, root, task: dict, images: bool, out: str = "out", rows_per_unit: int = 7) -> list[dict]:
    cfg = config_from_dict({
        "model": {"path": str(ckpt), "device": "cpu"},
        "input": {"paths": [str(root / "data.parquet")], "image_column": "image" if images else None,
                  "columns": ["query", "doc"]},
        "task": {"type": "rerank", "query": "{query}"} | task, "output": {"path": str(root / out)},
        "run": {"workers": 0, "rows_per_unit": rows_per_unit, "batch_tokens": 4096}})
    assert worker.run(cfg) == 0
    rows = ds.dataset(cfg.output.path).to_table().sort_by("id").to_pylist()
    assert all(r["error"] is None for r in rows)
    schema = ds.dataset(cfg.output.path).schema
    assert schema.field("score").type == pa.float32() and schema.field("raw_scores").type == pa.list_(pa.float32())
    return rows


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --- Qwen3-Reranker: the model card's code ---------------------------------------------------------------------

def qwen3_card(ckpt, pairs):
    """The Qwen3-Reranker model card: prefix, format_instruction, suffix; compute_logits."""
    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    token_false_id, token_true_id = tokenizer.convert_tokens_to_ids("no"), tokenizer.convert_tokens_to_ids("yes")
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    out = []
    for query, doc in pairs:
        text = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
        ids = prefix_tokens + tokenizer(text)["input_ids"] + suffix_tokens
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        yes, no = float(logits[token_true_id]), float(logits[token_false_id])
        score = float(torch.log_softmax(torch.tensor([no, yes]), 0)[1].exp())
        out.append((yes, no, score))
    return out


def test_qwen3_reranker_matches_its_model_card(tmp_path):
    ckpt = build_checkpoint(tmp_path / "model", "qwen3", template=QWEN3_TEMPLATE)
    corpus(tmp_path)
    rows = run(ckpt, tmp_path, {"document": "{doc}"}, images=False)
    want = qwen3_card(ckpt, zip(QUERIES, DOCS))
    for row, (yes, no, score) in zip(rows, want):
        assert np.abs(np.array(row["raw_scores"]) - [yes, no]).max() <= TOL, row
        assert abs(row["score"] - score) <= TOL


# --- Qwen3-VL-Reranker: QwenLM/Qwen3-VL-Embedding src/models/qwen3_vl_reranker.py ------------------------------

def qwen3_vl_card(ckpt, queries, docs, images):
    """Qwen3VLReranker.process: format_mm_instruction through the chat template, the processor, the last hidden
    state of the base model times (w_yes - w_no), sigmoid."""
    processor = tf.AutoProcessor.from_pretrained(ckpt, padding_side="left")
    lm = tf.Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    vocab = processor.tokenizer.get_vocab()
    w = lm.lm_head.weight[vocab["yes"]] - lm.lm_head.weight[vocab["no"]]
    out = []
    for i, (query, doc) in enumerate(zip(queries, docs)):
        image = images[i] if images else None
        contents = [{"type": "text", "text": "<Instruct>: Given a search query, retrieve relevant candidates that "
                                             "answer the query."},
                    {"type": "text", "text": "<Query>:"}, {"type": "text", "text": query},
                    {"type": "text", "text": "\n<Document>:"}]
        contents += [{"type": "image"}] if image else [{"type": "text", "text": doc}]
        pair = [{"role": "system", "content": [{"type": "text", "text": (
                    "Judge whether the Document meets the requirements based on the Query and the Instruct "
                    "provided. Note that the answer can only be \"yes\" or \"no\".")}]},
                {"role": "user", "content": contents}]
        text = processor.apply_chat_template([pair], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=text, images=[Image.open(io.BytesIO(image))] if image else None, return_tensors="pt")
        with torch.no_grad():
            h = lm.model(**inputs).last_hidden_state[0, -1]
            out.append(float(torch.sigmoid(h @ w)))
    return out


@pytest.mark.parametrize("images", [True, False], ids=["image-documents", "text-documents"])
def test_qwen3_vl_reranker_matches_its_reference_code(tmp_path, images):
    ckpt = build_checkpoint(tmp_path / "model", "qwen3_vl")
    corpus(tmp_path, images)
    rows = run(ckpt, tmp_path, {} if images else {"document": "{doc}"}, images)
    pics = pq.read_table(tmp_path / "data.parquet").column("image").to_pylist() if images else None
    for row, score in zip(rows, qwen3_vl_card(ckpt, QUERIES, DOCS, pics)):
        assert abs(row["score"] - score) <= TOL, row
        assert abs(sigmoid(row["raw_scores"][0] - row["raw_scores"][1]) - row["score"]) < 1e-6


# --- jina-reranker-m0: its modeling.py ---------------------------------------------------------------------------

def m0_card(ckpt, queries, docs, images):
    """JinaVLForRanking.compute_score: formatting_prompts_func, the processor, score token 100 appended, the score
    MLP (reimplemented here) on the last hidden state, sigmoid(s - 2.65)."""
    processor = tf.AutoProcessor.from_pretrained(ckpt)
    model = tf.Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    weights = load_file(ckpt / "model.safetensors")
    hidden = model.config.text_config.hidden_size
    score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    score.load_state_dict({k.removeprefix("score."): v for k, v in weights.items() if k.startswith("score.")})
    out = []
    for i, (query, doc) in enumerate(zip(queries, docs)):
        if images:
            prompt = "**Document**:\n<|vision_start|><|image_pad|><|vision_end|>" + "\n" + f"**Query**:\n{query}"
            batch = processor(text=[prompt], images=[Image.open(io.BytesIO(images[i]))], return_tensors="pt")
        else:
            batch = processor(text=[f"**Document**:\n{doc}" + "\n" + f"**Query**:\n{query}"], return_tensors="pt")
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, 1), 100)], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones((1, 1), dtype=torch.long)], dim=1)
        if "mm_token_type_ids" in batch:  # transformers 5's processor marks image tokens too: token 100 is text
            batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros((1, 1), dtype=torch.long)], 1)
        with torch.no_grad():
            s = float(score(model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]).squeeze())
        out.append((s, 1.0 / (1.0 + np.exp(-(s - 2.65)))))
    return out


@pytest.mark.parametrize("images", [True, False], ids=["image-documents", "text-documents"])
def test_jina_m0_matches_its_modeling_code(tmp_path, images):
    ckpt = build_checkpoint(tmp_path / "model", "jina_m0")  # transformers 4.4x names, an LM head nobody reads
    corpus(tmp_path, images)
    rows = run(ckpt, tmp_path, {} if images else {"document": "{doc}"}, images)
    pics = pq.read_table(tmp_path / "data.parquet").column("image").to_pylist() if images else None
    for row, (s, score) in zip(rows, m0_card(ckpt, QUERIES, DOCS, pics)):
        assert abs(row["raw_scores"][0] - s) <= TOL, row
        assert abs(row["score"] - score) <= TOL


# --- jina-reranker-v3: its modeling.py ---------------------------------------------------------------------------

def v3_card(ckpt, query: str, docs: list[str]) -> np.ndarray:
    """JinaForRanking: format_docs_prompts_func (with sanitize_input), the tokenizer, the last hidden states at
    <|embed_token|> and <|rerank_token|>, the projector (reimplemented here), cosine."""
    special = {"query_embed_token": "<|rerank_token|>", "doc_embed_token": "<|embed_token|>"}
    sanitize = lambda t: t.replace("<|rerank_token|>", "").replace("<|embed_token|>", "")  # noqa: E731
    query, docs = sanitize(query), [sanitize(d) for d in docs]
    prefix = ("<|im_start|>system\nYou are a search relevance expert who can determine a ranking of the passages "
              "based on how relevant they are to the query. If the query is a question, how relevant a passage is "
              "depends on how well it answers the question. If not, try to analyze the intent of the query and "
              "assess how well each passage satisfies the intent. If an instruction is provided, you should follow "
              "the instruction when determining the ranking.<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n" + "<think>\n\n</think>\n\n"
    prompt = (f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
              f"Rank the passages based on their relevance to query: {query}\n")
    prompt += "\n".join(f'<passage id="{i}">\n{d}{special["doc_embed_token"]}\n</passage>' for i, d in enumerate(docs))
    prompt += "\n" + f"<query>\n{query}{special['query_embed_token']}\n</query>"
    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt)
    model = tf.Qwen3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tokenizer(text=[prefix + prompt + suffix], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    weights = load_file(ckpt / "model.safetensors")
    h = model.config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(h, h // 2, bias=False), torch.nn.ReLU(),
                                    torch.nn.Linear(h // 2, 512, bias=False))
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in weights.items()
                               if k.startswith("projector.")})
    doc_id, query_id = tokenizer.convert_tokens_to_ids(["<|embed_token|>", "<|rerank_token|>"])
    with torch.no_grad():
        d = projector(hidden[ids[0] == doc_id])
        q = projector(hidden[ids[0] == query_id])
        return torch.nn.functional.cosine_similarity(d, q.expand_as(d), dim=-1).numpy()


def blocks(queries, n: int, unit: int) -> list[list[int]]:
    """Rows in prompts: runs of the same query within a unit, at most n rows each."""
    out = []
    for i, q in enumerate(queries):
        if out and queries[out[-1][-1]] == q and len(out[-1]) < n and out[-1][-1] // unit == i // unit:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@pytest.mark.parametrize("block,unit", [(125, 100), (2, 100), (3, 4)], ids=["whole-queries", "block-2", "units-of-4"])
def test_jina_v3_listwise_matches_its_modeling_code(tmp_path, block, unit):
    ckpt = build_checkpoint(tmp_path / "model", "jina_v3", tie=True)
    corpus(tmp_path)
    rows = run(ckpt, tmp_path, {"document": "{doc}", "block": block}, images=False, rows_per_unit=unit)
    groups = blocks(QUERIES, block, unit)
    assert max(map(len, groups)) == min(block, 5)  # the car query's five documents share prompts
    for group in groups:
        want = v3_card(ckpt, QUERIES[group[0]], [DOCS[i] for i in group])
        got = np.array([rows[i]["score"] for i in group])
        assert np.abs(got - want).max() <= TOL, (group, got, want)
        assert all(rows[i]["raw_scores"] == [rows[i]["score"]] for i in group)


# --- bge-reranker-v2-gemma: its model card's code ---------------------------------------------------------------

LONG_QUERY, LONG_DOC = " ".join(["red cat"] * 500), " ".join(["a green tree house"] * 400)  # past 768 and 1024


def bge_gemma_card(ckpt, pairs, prompt=None, max_length=1024):
    """The bge-reranker-v2-gemma model card: get_inputs, then the logit of tokenizer("Yes")[0] at the last position.
    transformers 5 has no prepare_for_model: its truncation="only_second" (transformers 4's truncate_sequences,
    right side) is written out."""
    tokenizer = tf.AutoTokenizer.from_pretrained(ckpt)
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    yes_loc = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    if prompt is None:
        prompt = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
                  "providing a prediction of either 'Yes' or 'No'.")
    sep = "\n"
    prompt_inputs = tokenizer(prompt, return_tensors=None, add_special_tokens=False)["input_ids"]
    sep_inputs = tokenizer(sep, return_tensors=None, add_special_tokens=False)["input_ids"]
    out = []
    for query, passage in pairs:
        query_inputs = tokenizer(f"A: {query}", return_tensors=None, add_special_tokens=False,
                                 max_length=max_length * 3 // 4, truncation=True)
        passage_inputs = tokenizer(f"B: {passage}", return_tensors=None, add_special_tokens=False,
                                   max_length=max_length, truncation=True)
        ids, pair_ids = [tokenizer.bos_token_id] + query_inputs["input_ids"], sep_inputs + passage_inputs["input_ids"]
        remove = len(ids) + len(pair_ids) - max_length
        if remove > 0:
            pair_ids = pair_ids[:-remove]
        item = ids + pair_ids + sep_inputs + prompt_inputs
        with torch.no_grad():
            out.append(float(model(input_ids=torch.tensor([item])).logits[0, -1, yes_loc]))
    return out


@pytest.mark.parametrize("instruction", [None, "Is passage B about query A? Answer 'Yes' or 'No'."],
                         ids=["card-prompt", "own-prompt"])
def test_bge_reranker_v2_gemma_matches_its_model_card_with_its_truncation(tmp_path, instruction):
    ckpt = build_checkpoint(tmp_path / "model", "gemma")
    queries, docs = QUERIES + [LONG_QUERY, "cat", LONG_QUERY], DOCS + ["a cat", LONG_DOC, LONG_DOC]
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(len(queries))], "query": queries, "doc": docs}),
                   tmp_path / "data.parquet", row_group_size=4)
    rows = run(ckpt, tmp_path, {"document": "{doc}", "instruction": instruction}, images=False)
    tok = tf.AutoTokenizer.from_pretrained(ckpt)
    assert len(tok(f"A: {LONG_QUERY}").input_ids) > 768 and len(tok(f"B: {LONG_DOC}").input_ids) > 1024
    for row, logit in zip(rows, bge_gemma_card(ckpt, zip(queries, docs), instruction)):
        assert abs(row["raw_scores"][0] - logit) <= TOL, row
        assert abs(row["score"] - sigmoid(logit)) <= TOL


def test_recipes_follow_the_checkpoint_and_a_wrong_one_is_refused(tmp_path):
    m0 = build_checkpoint(tmp_path / "m0", "jina_m0")
    qwen = build_checkpoint(tmp_path / "qwen", "qwen3")
    corpus(tmp_path, images=True)

    def spec(ckpt, task, images=True):
        return open_spec(config_from_dict({
            "model": {"path": str(ckpt), "device": "cpu"},
            "input": {"paths": [str(tmp_path / "data.parquet")], "image_column": "image" if images else None,
                      "columns": ["query", "doc"]},
            "task": {"type": "rerank", "query": "{query}"} | task, "output": {"path": str(tmp_path / "o")}}),
            "cpu", "float32", 0)

    gemma = build_checkpoint(tmp_path / "gemma", "gemma")
    assert spec(m0, {}).tasks.tasks[""].name == "jina_m0"
    assert spec(qwen, {"document": "{doc}"}, images=False).tasks.tasks[""].name == "qwen3"
    assert spec(gemma, {"document": "{doc}"}, images=False).tasks.tasks[""].name == "bge_gemma"
    with pytest.raises(ConfigError, match=r"task\.recipe: jina_v3 needs a JinaForRanking checkpoint"):
        spec(qwen, {"recipe": "jina_v3"}, images=False)
    with pytest.raises(ConfigError, match=r"task\.recipe: .* is a JinaVLForRanking, scored by its own head: use "
                                          r"jina_m0"):
        spec(m0, {"recipe": "qwen3"})
    with pytest.raises(ConfigError, match=r"task\.document: jina_m0 scores an image document alone"):
        spec(m0, {"document": "{doc}"})
    weights = load_file(m0 / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "score.2.bias"}, m0 / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lacks tensors the model needs: 'head\.out_proj\.bias'"):
        spec(m0, {}).load_engine()
    save_file(weights | {"score.4.weight": weights["score.2.weight"].clone()}, m0 / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"tensors this model does not use: 'score\.4\.weight'"):
        spec(m0, {}).load_engine()


@pytest.mark.parametrize("family,images,task", [
    ("qwen3", False, {"document": "{doc}"}), ("qwen3_vl", True, {}), ("jina_m0", True, {}),
    ("jina_v3", False, {"document": "{doc}", "block": 3}), ("gemma", False, {"document": "{doc}"})],
    ids=["qwen3", "qwen3_vl", "jina_m0", "jina_v3", "bge_gemma"])
def test_verify_compares_each_recipe_with_its_card(tmp_path, family, images, task):
    ckpt = build_checkpoint(tmp_path / "model", family)
    corpus(tmp_path, images)
    cfg = config_from_dict({
        "model": {"path": str(ckpt), "device": "cpu"},
        "input": {"paths": [str(tmp_path / "data.parquet")], "image_column": "image" if images else None,
                  "columns": ["query", "doc"]},
        "task": {"type": "rerank", "query": "{query}"} | task, "output": {"path": str(tmp_path / "out")}})
    console = Console(file=io.StringIO(), width=200)
    assert verify(cfg, 8, "cpu", "float32", console) == 0
    text = console.file.getvalue()
    assert "8 row-questions compared" in text and "OK" in text, text


def test_listwise_blocks_through_prep_workers_in_a_subprocess(tmp_path, po_batch_cli):
    """`po-batch run` with a process pool: the recipe and each block's rows travel to the workers and back."""
    import yaml

    ckpt = build_checkpoint(tmp_path / "model", "jina_v3", tie=True)
    corpus(tmp_path)
    alone = run(ckpt, tmp_path, {"document": "{doc}", "block": 3}, images=False, out="alone", rows_per_unit=4)
    config = {"model": {"path": str(ckpt), "device": "cpu"},
              "input": {"paths": [str(tmp_path / "data.parquet")], "image_column": None, "columns": ["query", "doc"]},
              "task": {"type": "rerank", "query": "{query}", "document": "{doc}", "block": 3},
              "output": {"path": str(tmp_path / "pool")}, "run": {"workers": 2, "rows_per_unit": 4}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r = po_batch_cli("run", tmp_path / "config.yaml")
    assert r.returncode == 0, r.stderr
    pooled = ds.dataset(tmp_path / "pool").to_table().sort_by("id").to_pylist()
    assert [r["id"] for r in pooled] == [r["id"] for r in alone]
    assert np.abs(np.array([r["score"] for r in pooled]) - [r["score"] for r in alone]).max() < 1e-6
