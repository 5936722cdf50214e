"""Tasks end to end on tiny random checkpoints: labels (first_token and full) against transformers' own log-probs,
several questions per image against separate single-question runs, and the task config's errors."""

import io
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from po_batch import worker
from po_batch.config import ConfigError, config_from_dict
from po_batch.models.registry import FAMILIES as FAMILIES_BY_TYPE
from po_batch.prep.prompt import PromptError
from po_batch.spec import open_spec
from po_batch.tiny import build_checkpoint

FAMILIES = ["qwen3_vl", "qwen2_vl", "qwen2_5_vl", "qwen3", "gemma2"]
FIRST = ["yes", "no", "Yes", "No"]              # one token each for the tiny tokenizer
FULL = ["c", "car", "card", "cat", "yes"]       # 1, 2, 3 and 2 tokens, four of them starting with "c"
PROMPT = "Is there a {category} in this image? Answer yes or no."
QUESTION = "Which word fits the {category}?"
SIZES = [(40, 200), (77, 179), (114, 158), (151, 137), (188, 116)]


def picture(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=FAMILIES)
def corpus(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    vision = family.endswith("_vl")
    table = {"id": [f"r{i}" for i in range(len(SIZES))], "category": ["cat", "dog", "car", "tree", "house"]}
    if vision:
        table["image"] = pa.array([picture(w, h, i) for i, (w, h) in enumerate(SIZES)], pa.binary())
    pq.write_table(pa.table(table), root / "data.parquet", row_group_size=2)
    return family, build_checkpoint(root / "model", family), root


def config(corpus, task: dict, out: str, **run):
    family, ckpt, root = corpus
    vision = family.endswith("_vl")
    return config_from_dict({
        "model": {"path": str(ckpt), "device": "cpu"},
        "input": {"paths": [str(root / "data.parquet")], "image_column": "image" if vision else None,
                  "columns": ["category"]},
        "task": task, "output": {"path": str(root / out)},
        "run": {"workers": 0, "rows_per_unit": 3, "batch_tokens": 4096} | run})


def output(cfg) -> list[dict]:
    assert worker.run(cfg) == 0
    return ds.dataset(cfg.output.path).to_table().sort_by("id").to_pylist()


class Reference:
    """transformers' own scores for one row: the chat-templated prompt through the processor, then the logits at
    the last position, or the summed log-probs of an answer's tokens appended to the prompt."""

    def __init__(self, ckpt, vision: bool):
        import transformers as tf

        auto = tf.AutoModelForImageTextToText if vision else tf.AutoModelForCausalLM
        self.model = auto.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.proc = tf.AutoProcessor.from_pretrained(ckpt) if vision else tf.AutoTokenizer.from_pretrained(ckpt)
        self.vision = vision

    def inputs(self, text: str, image: bytes | None, answer: str = ""):
        content = [{"type": "image"}, {"type": "text", "text": text}] if self.vision else text
        prompt = self.proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True) + answer
        if not self.vision:
            return self.proc([prompt], return_tensors="pt")
        return self.proc(text=[prompt], images=[Image.open(io.BytesIO(image))], return_tensors="pt")

    def logits(self, text, image) -> np.ndarray:
        with torch.no_grad():
            return self.model(**self.inputs(text, image)).logits[0, -1].numpy()

    def logprob(self, text, image, answer: str) -> float:
        n_prompt = self.inputs(text, image)["input_ids"].shape[1]
        inputs = self.inputs(text, image, answer)
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            logp = self.model(**inputs).logits[0].log_softmax(-1)
        return float(sum(logp[j - 1, ids[j]] for j in range(n_prompt, len(ids))))


def test_labels_match_transformers_first_token_logits_and_full_log_probs(corpus):
    family, ckpt, root = corpus
    cfg = config(corpus, {"type": "labels", "prompt": QUESTION, "labels": FULL, "label_scoring": "full"}, "full")
    spec = open_spec(cfg, "cpu", "float32", 0)
    lengths = [len(spec.tokenizer.encode(w, add_special_tokens=False)) for w in FULL]
    assert sorted(set(lengths)) == [1, 2, 3]  # the labels cover 1-, 2- and 3-token continuations
    full = output(cfg)
    first = output(config(corpus, {"type": "labels", "prompt": QUESTION, "labels": FIRST}, "first"))
    images = pq.read_table(root / "data.parquet").column("image").to_pylist() if family.endswith("_vl") else \
        [None] * len(SIZES)
    ref = Reference(ckpt, family.endswith("_vl"))
    ids = [spec.tokenizer.convert_tokens_to_ids(w) for w in FIRST]
    for r_full, r_first, image in zip(full, first, images):
        text = QUESTION.format(category=r_full["category"])
        want = np.array([ref.logprob(text, image, label) for label in FULL])
        assert np.abs(np.array(r_full["label_scores"]) - want).max() <= 1e-3, (family, r_full, want)
        assert r_full["label"] == FULL[int(want.argmax())] and r_full["error"] is None
        probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
        assert np.abs(np.array(r_full["label_probs"]) - probs).max() <= 1e-4
        logits = ref.logits(text, image)[ids]
        assert np.abs(np.array(r_first["label_scores"]) - logits).max() <= 1e-3, (family, r_first, logits)
        assert r_first["label"] == FIRST[int(logits.argmax())]
        assert abs(r_first["label_prob"] - max(r_first["label_probs"])) < 1e-7
    schema = ds.dataset(cfg.output.path).schema
    assert schema.field("label").type == pa.string() and schema.field("label_prob").type == pa.float32()
    assert schema.field("label_probs").type == pa.list_(pa.float32()) == schema.field("label_scores").type


def test_three_questions_equal_three_single_runs_and_each_image_goes_through_the_tower_once(corpus, monkeypatch):
    family, ckpt, root = corpus
    tasks = {"dog": {"type": "yes_no", "prompt": PROMPT},
             "word": {"type": "labels", "prompt": QUESTION, "labels": FIRST},
             "long": {"type": "labels", "prompt": "Name the {category} in a word.", "labels": FULL,
                      "label_scoring": "full"}}
    seen = []  # images per call of the family's vision tower
    if family.endswith("_vl"):
        module = sys.modules[FAMILIES_BY_TYPE[family].__module__]
        forward = module.VisionModel.forward
        monkeypatch.setattr(module.VisionModel, "forward",
                            lambda self, patches, grids: seen.append(len(grids)) or forward(self, patches, grids))
    together = output(config(corpus, {"questions": tasks}, "together"))
    if family.endswith("_vl"):
        assert sum(seen) == len(SIZES)  # one pass of the vision tower per image, for all three questions
    for name, task in tasks.items():
        alone = output(config(corpus, task, f"alone-{name}"))
        for a, t in zip(alone, together):
            for column, value in a.items():
                if column in ("id", "category", "error"):
                    assert t[column] == value
                    continue
                mine = t[f"{name}_{column}"]
                if isinstance(value, str):
                    assert mine == value
                else:
                    assert np.abs(np.array(mine) - np.array(value)).max() <= 1e-4, (name, column, mine, value)


def test_questions_share_the_prefix_so_a_row_costs_fewer_tokens(corpus):
    family, ckpt, root = corpus
    tasks = {f"q{i}": {"prompt": PROMPT.replace("Answer", f"Answer ({i})")} for i in range(5)}
    spec = open_spec(config(corpus, {"questions": tasks}, "tokens"), "cpu", "float32", 0)
    image = picture(*SIZES[0], 0) if family.endswith("_vl") else None
    row = spec.prep((image, {"id": "r0", "category": "cat"}))
    one = open_spec(config(corpus, tasks["q0"], "tokens1"), "cpu", "float32", 0).prep((image, {"id": "r0",
                                                                                               "category": "cat"}))
    head = one.tokens - (row.segments[1, 0])  # the shared part: everything before the first question's text
    assert row.tokens == head + 5 * row.segments[1, 0] and len(row.segments) == 6
    assert (row.segments[1:, 1] == 0).all() and row.segments[0, 2] == 0 and (row.segments[1:, 2] == 1).all()


def test_label_and_question_config_errors_name_the_key(corpus, tmp_path):
    family, ckpt, root = corpus
    if family != "qwen3_vl":
        pytest.skip("the tokenizer is the same for every family")
    with pytest.raises(PromptError, match=r"task\.labels: 'car' is 2 tokens in context \('c', 'ar'\); "
                                          r"label_scoring: first_token needs one token"):
        open_spec(config(corpus, {"type": "labels", "prompt": QUESTION, "labels": ["yes", "car"]}, "e"), "cpu",
                  "float32", 0)
    with pytest.raises(PromptError, match=r"task\.questions\.q\.labels: 'cat' is 2 tokens in context"):
        open_spec(config(corpus, {"questions": {"q": {"type": "labels", "prompt": QUESTION,
                                                      "labels": ["c", "cat"], "label_scoring": "first_token"}}},
                         "e"), "cpu", "float32", 0)
    with pytest.raises(ConfigError, match=r"task\.questions\.category: its output column 'category_p_yes'"):
        # a question named like a passthrough column is fine; its column must not be one
        cfg = config(corpus, {"questions": {"category": {"prompt": PROMPT}}}, "e")
        cfg.input.columns.append("category_p_yes")
        open_spec(cfg, "cpu", "float32", 0)
    with pytest.raises(ConfigError, match=r"task\.questions: '2nd' is not a valid question name"):
        config(corpus, {"questions": {"2nd": {"prompt": PROMPT}}}, "e")
    with pytest.raises(ConfigError, match=r"task\.questions\.dog\.labels: 'x' is listed twice"):
        config(corpus, {"questions": {"dog": {"type": "labels", "prompt": PROMPT, "labels": ["x", "x"]}}}, "e")
    with pytest.raises(ConfigError, match=r"task\.type: must be 'yes_no', 'labels', 'embed', 'rerank'"):
        config(corpus, {"type": "colour", "prompt": PROMPT}, "e")
