"""Rerank recipes: each builds the exact prompt of a model card around a row's query and document, says what the
engine reads for it, and turns the readout into the card's raw values and score. A recipe is also the prompt prep
encodes (picklable). Sources of every fixed string and number are named beside it.

qwen3    Qwen3-Reranker (model card, and vLLM's examples/offline_inference/qwen3_reranker.py): the judge system
         prompt, "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}", an empty think block;
         score sigmoid(l_yes - l_no). Qwen3-VL-Reranker (QwenLM/Qwen3-VL-Embedding src/models/qwen3_vl_reranker.py):
         the same messages through the checkpoint's chat template, the image inside the document.
jina_m0  jina-reranker-m0 (its modeling.py, JinaVLForRanking): no chat template, "**Document**:\n{d}\n**Query**:\n{q}",
         token id 100 appended, score MLP at the last position, sigmoid(s - 2.65).
jina_v3  jina-reranker-v3 (its modeling.py, JinaForRanking): listwise, one prompt holds up to 125 documents then the
         query; a projector at each <|embed_token|> and at the query's <|rerank_token|>; cosine.
bge_gemma  bge-reranker-v2-gemma (its model card's get_inputs, FlagEmbedding's FlagLLMReranker): no chat template,
         [bos] + "A: {query}" + "\n" + "B: {doc}" + "\n" + its prompt, each piece tokenized alone without special
         tokens, the query cut to 768 tokens and the pair to 1024; the logit of "Yes" at the last position,
         sigmoid (compute_score(normalize=True))."""

from dataclasses import dataclass

import numpy as np

from po_batch.config import ConfigError, RerankTask
from po_batch.prep.pieces import Piece, Pieces, split_controls
from po_batch.prep.prompt import PromptError, text_tokenizer
from po_batch.sample import NO_TARGET
from po_batch.tasks.base import Oracle, Reads

# Qwen3-Reranker model card
JUDGE = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
         'Note that the answer can only be "yes" or "no".')
QWEN3_PREFIX = f"<|im_start|>system\n{JUDGE}<|im_end|>\n<|im_start|>user\n"
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen3VLReranker(default_instruction=...)
QWEN3_VL_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
# jina-reranker-m0 modeling.py: score_token_id, LOGIT_BIAS
M0_SCORE_TOKEN, M0_LOGIT_BIAS = 100, 2.65
M0_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # formatting_prompts_func, doc_type image
# jina-reranker-v3 modeling.py: format_docs_prompts_func, special_tokens
V3_SYSTEM = ("You are a search relevance expert who can determine a ranking of the passages based on how relevant "
             "they are to the query. If the query is a question, how relevant a passage is depends on how well it "
             "answers the question. If not, try to analyze the intent of the query and assess how well each passage "
             "satisfies the intent. If an instruction is provided, you should follow the instruction when "
             "determining the ranking.")
V3_PREFIX = f"<|im_start|>system\n{V3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
V3_DOC, V3_QUERY = "<|embed_token|>", "<|rerank_token|>"
# bge-reranker-v2-gemma model card: get_inputs(prompt=None, max_length=1024)
BGE_PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
              "providing a prediction of either 'Yes' or 'No'.")
BGE_MAX = 1024
BGE_QUERY_MAX = BGE_MAX * 3 // 4
S1, S2 = "\x00po-batch-query\x00", "\x00po-batch-document\x00"

# recipe: auto, by config.json's architectures[0] (else qwen3); the Jina recipes read the head of their architecture
RECIPE_OF = {"JinaVLForRanking": "jina_m0", "JinaForRanking": "jina_v3", "GemmaForCausalLM": "bge_gemma"}
HEAD_OF = {"jina_m0": "JinaVLForRanking", "jina_v3": "JinaForRanking"}


def _fmt(template: str, fields: dict) -> str:
    return template.format_map(fields)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _one_row(ids: np.ndarray, positions: np.ndarray) -> dict:
    """A one-row sample read at its last position."""
    return {"input_ids": ids, "positions": positions, "segments": np.array([[len(ids), -1, 1]], dtype=np.int32),
            "targets": np.array([NO_TARGET], dtype=np.int32)}


@dataclass
class Qwen3:
    pieces: Pieces
    templates: list[str]         # the row's texts, with {column} fields
    texts: list[str]             # the fixed strings around them (one more)
    parts: list[list]            # the same as pieces
    candidates: list[int]        # "yes", "no"
    head = "logits"
    width, outputs, block, midpoint = 2, 1, 1, 0.5

    @classmethod
    def build(cls, cfg: RerankTask, tokenizer, ckpt, image: bool) -> "Qwen3":
        backend = tokenizer.backend_tokenizer
        yes, no = (tokenizer.get_vocab().get(w) for w in ("yes", "no"))
        if yes is None or no is None:
            raise PromptError("task.recipe: qwen3 reads the tokens 'yes' and 'no', which this tokenizer lacks")
        if not ckpt.is_vision:  # Qwen3-Reranker: query and document in one text, its card's format_instruction
            instruction = (cfg.instruction or QWEN3_INSTRUCTION).replace("{", "{{").replace("}", "}}")
            body = f"<Instruct>: {instruction}\n<Query>: {cfg.query}\n<Document>: {cfg.document}"
            enc = lambda s: backend.encode(s, add_special_tokens=False).ids  # noqa: E731
            # the card tokenizes its prefix, the pair and its suffix apart: the prefix and suffix as ids
            return cls(Pieces(text_tokenizer(backend), None), [body], [QWEN3_PREFIX, QWEN3_SUFFIX],
                       [enc(QWEN3_PREFIX), enc(QWEN3_SUFFIX)], [yes, no])
        content = [{"type": "text", "text": "<Instruct>: " + (cfg.instruction or QWEN3_VL_INSTRUCTION)},
                   {"type": "text", "text": "<Query>:"}, {"type": "text", "text": S1},
                   {"type": "text", "text": "\n<Document>:"}, *([{"type": "image"}] if image else []),
                   {"type": "text", "text": S2}]
        if tokenizer.chat_template is None:
            raise PromptError("task.recipe: qwen3 on a vision model renders its messages with the checkpoint's chat "
                              "template, which it lacks")
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": [{"type": "text", "text": JUDGE}]}, {"role": "user", "content": content}],
            tokenize=False, add_generation_prompt=True)
        head, rest = rendered.split(S1)
        texts = [head, *rest.split(S2)]
        return cls(Pieces(text_tokenizer(backend), ckpt.config.get("image_token_id")), [cfg.query, cfg.document],
                   texts, [split_controls(s, backend) for s in texts], [yes, no])

    @property
    def fixed(self) -> list:
        return ["qwen3", *self.texts]

    def group(self, fields: dict):
        return None

    def encode(self, fields: dict, picture) -> dict:
        pieces = list(self.parts[0])
        for template, part in zip(self.templates, self.parts[1:]):
            pieces += [_fmt(template, fields), *part]
        return _one_row(*self.pieces.encode(pieces, picture))

    def raw(self, reads: Reads) -> np.ndarray:
        return reads.cand[:, 0]

    def score(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(raw[:, 0] - raw[:, 1])

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        """The card's: the prompt string through the checkpoint's tokenizer (processor), the LM head's yes and no
        rows at the last position."""
        prompt = self.texts[0] + "".join(_fmt(t, rows[0]) + s for t, s in zip(self.templates, self.texts[1:]))
        _, hidden = oracle.run(prompt)
        return (oracle.lm_rows(self.candidates) @ hidden[-1])[None]


@dataclass
class JinaM0:
    pieces: Pieces
    query: str
    document: str
    image: bool
    vision: list                 # <|vision_start|><|image_pad|><|vision_end|> as ids
    head = "model"
    width, outputs, block, midpoint, candidates = 1, 1, 1, 0.5, []

    @classmethod
    def build(cls, cfg: RerankTask, tokenizer, ckpt, image: bool) -> "JinaM0":
        if image and cfg.document:
            raise ConfigError("task.document: jina_m0 scores an image document alone (its card has no text beside "
                              "the image); leave task.document empty")
        backend = tokenizer.backend_tokenizer
        return cls(Pieces(text_tokenizer(backend), ckpt.config.get("image_token_id")), cfg.query, cfg.document, image,
                   split_controls(M0_IMAGE, backend))

    @property
    def fixed(self) -> list:
        return ["jina_m0", M0_SCORE_TOKEN]

    def group(self, fields: dict):
        return None

    def prompt(self, fields: dict, image: list) -> list:
        """The card's formatting_prompts_func(query, doc, doc_type) with `image` for the image's placeholder."""
        q = _fmt(self.query, fields)
        if not self.image:
            return [f"**Document**:\n{_fmt(self.document, fields)}\n**Query**:\n{q}"]
        return ["**Document**:\n", *image, f"\n**Query**:\n{q}"]

    def encode(self, fields: dict, picture) -> dict:
        return _one_row(*self.pieces.encode([*self.prompt(fields, self.vision), M0_SCORE_TOKEN], picture))

    def raw(self, reads: Reads) -> np.ndarray:
        return reads.values[:, 0, :1]

    def score(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(raw[:, 0] - M0_LOGIT_BIAS)

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        """The card's compute_score: the processor's tokens of the prompt, token 100 appended, the score MLP on the
        last hidden state."""
        _, hidden = oracle.run("".join(self.prompt(rows[0], [M0_IMAGE])), [M0_SCORE_TOKEN])
        h = np.maximum(oracle.tensor("score.0.weight") @ hidden[-1] + oracle.tensor("score.0.bias"), 0)
        return (oracle.tensor("score.2.weight") @ h + oracle.tensor("score.2.bias"))[None]


@dataclass
class JinaV3:
    pieces: Pieces
    query: str
    document: str
    instruction: str | None
    block: int
    doc_id: int
    query_id: int
    prefix: list                 # V3_PREFIX as pieces
    head = "model"
    width, outputs, midpoint, candidates = 512, 2, 0.0, []

    @classmethod
    def build(cls, cfg: RerankTask, tokenizer, ckpt, image: bool) -> "JinaV3":
        if image:
            raise ConfigError("input.image_column: jina_v3 ranks text documents; set it to null")
        vocab = tokenizer.get_vocab()
        if V3_DOC not in vocab or V3_QUERY not in vocab:
            raise PromptError(f"task.recipe: jina_v3 reads the tokens {V3_DOC} and {V3_QUERY}, which this "
                              "tokenizer lacks")
        backend = tokenizer.backend_tokenizer
        return cls(Pieces(text_tokenizer(backend), None), cfg.query, cfg.document, cfg.instruction, cfg.block,
                   vocab[V3_DOC], vocab[V3_QUERY], split_controls(V3_PREFIX, backend))

    @property
    def fixed(self) -> list:
        return ["jina_v3", V3_PREFIX]

    def group(self, fields: dict) -> str:
        return self._query(fields)

    def _query(self, fields: dict) -> str:
        return _sanitize(_fmt(self.query, fields))

    def prompt(self, rows: list[dict], prefix: list, doc: Piece, query: Piece) -> list:
        """The card's format_docs_prompts_func up to the query's token (what follows it changes no state read)."""
        q = self._query(rows[0])
        text = (f"I will provide you with {len(rows)} passages, each indicated by a numerical identifier. "
                f"Rank the passages based on their relevance to query: {q}\n")
        if self.instruction:
            text += f"<instruct>\n{self.instruction}\n</instruct>\n"
        pieces = list(prefix)
        for i, r in enumerate(rows):
            pieces += [text + f'<passage id="{i}">\n{_sanitize(_fmt(self.document, r))}', doc]
            text = "\n</passage>\n"
        return pieces + [text + f"<query>\n{q}", query]

    def encode(self, rows: list[dict], picture) -> dict:
        ids, positions = self.pieces.encode(self.prompt(rows, self.prefix, self.doc_id, self.query_id))
        docs, (query,) = np.flatnonzero(ids == self.doc_id), np.flatnonzero(ids == self.query_id)
        n = len(rows)
        outputs = np.stack([np.stack([docs, np.full(n, query)], 1).reshape(-1), np.arange(2 * n)], 1)
        return {"input_ids": ids, "positions": positions,
                "segments": np.array([[len(ids), -1, len(ids)]], dtype=np.int32),  # the last layer on every row
                "targets": np.full(2 * n, NO_TARGET, dtype=np.int32), "outputs": outputs.astype(np.int32), "rows": n}

    def raw(self, reads: Reads) -> np.ndarray:
        doc, query = reads.values[:, 0].astype(np.float64), reads.values[:, 1].astype(np.float64)
        norms = np.maximum(np.linalg.norm(doc, axis=1) * np.linalg.norm(query, axis=1), 1e-8)
        return ((doc * query).sum(1) / norms).astype(np.float32)[:, None]

    def score(self, raw: np.ndarray) -> np.ndarray:
        return raw[:, 0]

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        """The card's forward: the tokens of the whole prompt, the projector at the special tokens, cosine."""
        ids, hidden = oracle.run("".join(self.prompt(rows, [V3_PREFIX], V3_DOC, V3_QUERY)))
        w1, w2 = oracle.tensor("projector.0.weight"), oracle.tensor("projector.2.weight")
        proj = np.maximum(hidden[(ids == self.doc_id) | (ids == self.query_id)] @ w1.T, 0) @ w2.T
        doc, query = proj[:-1], proj[-1]
        return (doc @ query / np.maximum(np.linalg.norm(doc, axis=1) * np.linalg.norm(query), 1e-8))[:, None]


def _sanitize(text: str) -> str:
    """The card's sanitize_input: its two special tokens are removed from queries and documents."""
    return text.replace(V3_DOC, "").replace(V3_QUERY, "")


@dataclass
class BgeGemma:
    pieces: Pieces               # its tokenizer: each piece tokenized alone, special tokens in rows as text
    query: str
    document: str
    bos: int
    prompt: str                  # the card's prompt (or task.instruction)
    candidates: list[int]        # the first token of "Yes"
    head = "logits"
    width, outputs, block, midpoint = 1, 1, 1, 0.5

    @classmethod
    def build(cls, cfg: RerankTask, tokenizer, ckpt, image: bool) -> "BgeGemma":
        if image:
            raise ConfigError("input.image_column: bge_gemma ranks text documents; set it to null")
        if tokenizer.bos_token_id is None:
            raise PromptError("task.recipe: bge_gemma starts each prompt with the tokenizer's BOS, which it lacks")
        pieces = Pieces(text_tokenizer(tokenizer.backend_tokenizer), None, axes=1)
        yes = pieces.tokenizer.encode("Yes", add_special_tokens=False).ids
        return cls(pieces, cfg.query, cfg.document, tokenizer.bos_token_id, cfg.instruction or BGE_PROMPT, yes[:1])

    @property
    def fixed(self) -> list:
        return ["bge_gemma", self.prompt, BGE_QUERY_MAX, BGE_MAX]

    def group(self, fields: dict):
        return None

    def encode(self, fields: dict, picture) -> dict:
        enc = lambda s: self.pieces.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
        ids = bge_ids(enc, self.bos, _fmt(self.query, fields), _fmt(self.document, fields), self.prompt)
        return _one_row(np.array(ids, dtype=np.int32), np.arange(len(ids), dtype=np.int32)[None])

    def raw(self, reads: Reads) -> np.ndarray:
        return reads.cand[:, 0]

    def score(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(raw[:, 0])

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        """The card's: get_inputs through the checkpoint's tokenizer, the logit of tokenizer("Yes")[0] at the last
        position."""
        ids = bge_ids(oracle.encode, self.bos, _fmt(self.query, rows[0]), _fmt(self.document, rows[0]), self.prompt)
        return oracle.last_logits_of(ids)[oracle.encode("Yes")[:1]][None]


def bge_ids(enc, bos: int, query: str, passage: str, prompt: str) -> list[int]:
    """The card's get_inputs for one pair, `enc` tokenizing a piece alone without special tokens: the query cut
    to 768 tokens, the passage to 1024, then prepare_for_model(truncation="only_second", max_length=1024) cuts
    the end of the second part so [bos] + query + "\n" + passage holds at most 1024; "\n" + prompt after."""
    first, sep = [bos] + enc(f"A: {query}")[:BGE_QUERY_MAX], enc("\n")
    second = (sep + enc(f"B: {passage}")[:BGE_MAX])[:max(BGE_MAX - len(first), 0)]
    return first + second + sep + enc(prompt)


RECIPES = {"qwen3": Qwen3, "jina_m0": JinaM0, "jina_v3": JinaV3, "bge_gemma": BgeGemma}
