"""labels: the best of several labels. `first_token` reads each label's first-token logit at the question's last
position; `full` sums each label's token log-probabilities, every label a continuation of the same question in
the same forward pass (the question's last row predicts each first token, a label's own rows the rest)."""

import numpy as np
import pyarrow as pa

from po_batch.config import LabelsTask
from po_batch.prep.prompt import PromptError, PromptTemplate, in_context
from po_batch.sample import Question
from po_batch.tasks.base import Oracle, Reads, Task, list_array, softmax


class Labels(Task):
    columns = {"label": pa.string(), "label_prob": pa.float32(), "label_probs": pa.list_(pa.float32()),
               "label_scores": pa.list_(pa.float32())}

    def __init__(self, cfg: LabelsTask, key: str, tokenizer, template: PromptTemplate):
        self.key, self.labels = key, list(cfg.labels)
        self.answers = self.labels
        backend = tokenizer.backend_tokenizer
        toks = [in_context(template, backend, label) for label in self.labels]
        piece = lambda t: repr(tokenizer.decode([t]))  # noqa: E731
        self.full_vocab = cfg.label_scoring == "full"
        if not self.full_vocab:
            for label, t in zip(self.labels, toks):
                if len(t) != 1:
                    raise PromptError(f"{key}.labels: {label!r} is {len(t)} tokens in context "
                                      f"({', '.join(map(piece, t))}); label_scoring: first_token needs one token "
                                      f"per label (or use label_scoring: full)")
        first: dict[int, str] = {}
        for label, t in zip(self.labels, toks):
            if t[0] in first and not self.full_vocab:
                raise PromptError(f"{key}.labels: {first[t[0]]!r} and {label!r} start with the same token "
                                  f"({piece(t[0])}); use label_scoring: full")
            first.setdefault(t[0], label)
        if len(set(map(tuple, toks))) != len(toks):
            raise PromptError(f"{key}.labels: two labels are the same tokens")
        self.candidates = list(first)
        self.first = np.array([self.candidates.index(t[0]) for t in toks])
        # label i's rows among the question's reads: after the question's own row, one per token beyond the first
        self.branches = [(tuple(t[:-1]), tuple(t[1:])) for t in toks if len(t) > 1]
        self.spans, at = [], 1
        for t in toks:
            self.spans.append((at, at + len(t) - 1))
            at += len(t) - 1
        self.question = Question(cfg.prompt, tuple(self.branches) if self.full_vocab else ())

    def scores(self, reads: Reads) -> np.ndarray:
        first = reads.cand[:, 0, self.first]
        if not self.full_vocab:
            return first
        out = first - reads.lse[:, :1]
        for i, (a, b) in enumerate(self.spans):
            out[:, i] += (reads.target[:, a:b] - reads.lse[:, a:b]).sum(1)
        return out

    def values(self, reads: Reads) -> dict[str, pa.Array]:
        scores = self.scores(reads)
        probs = softmax(scores)
        best = probs.argmax(1)
        return {"label": pa.array([self.labels[i] for i in best], pa.string()),
                "label_prob": pa.array(probs[np.arange(len(best)), best]),
                "label_probs": list_array(probs), "label_scores": list_array(scores)}

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        text = self.question.text.format_map(rows[0])
        if self.full_vocab:
            return np.array([[oracle.logprob(text, label) for label in self.labels]], dtype=np.float32)
        return oracle.last_logits(text)[[self.candidates[i] for i in self.first]][None]
