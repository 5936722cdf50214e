"""yes_no: P(yes) from the logits of the two answer tokens at the question's last position."""

import numpy as np
import pyarrow as pa

from po_batch.config import YesNoTask
from po_batch.prep.prompt import PromptTemplate, answer_ids
from po_batch.sample import Question
from po_batch.tasks.base import Oracle, Reads, Task


class YesNo(Task):
    columns = {"yes_logit": pa.float32(), "no_logit": pa.float32(), "p_yes": pa.float32()}

    def __init__(self, cfg: YesNoTask, key: str, tokenizer, template: PromptTemplate):
        self.key, self.answers = key, [cfg.yes, cfg.no]
        self.question = Question(cfg.prompt)
        self.candidates = answer_ids(tokenizer, {f"{key}.yes": cfg.yes, f"{key}.no": cfg.no})

    def values(self, reads: Reads) -> dict[str, pa.Array]:
        yes, no = reads.cand[:, 0, 0], reads.cand[:, 0, 1]
        p_yes = (1.0 / (1.0 + np.exp(no.astype(np.float64) - yes))).astype(np.float32)
        return {"yes_logit": pa.array(yes), "no_logit": pa.array(no), "p_yes": pa.array(p_yes)}

    def scores(self, reads: Reads) -> np.ndarray:
        return reads.cand[:, 0, :]

    def reference(self, oracle: Oracle, rows: list[dict]) -> np.ndarray:
        return oracle.last_logits(self.question.text.format_map(rows[0]))[self.candidates][None]
