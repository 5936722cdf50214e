"""Tasks: what is asked of each row and what it writes. One file per task type; questions.py combines them."""

from po_batch.config import Config, EmbedTask, LabelsTask, RerankTask, YesNoTask, named_questions
from po_batch.prep.prompt import PromptTemplate
from po_batch.tasks.embed import Embed
from po_batch.tasks.labels import Labels
from po_batch.tasks.questions import Questions
from po_batch.tasks.rerank import Rerank
from po_batch.tasks.yes_no import YesNo

TYPES = {YesNoTask: YesNo, LabelsTask: Labels}
OWN = {EmbedTask: Embed, RerankTask: Rerank}  # tasks that see the checkpoint (its sizes, heads, special tokens)


def build_tasks(cfg: Config, tokenizer, template: PromptTemplate | None, ckpt, image: bool) -> Questions:
    """The config's questions, their tokens resolved with the checkpoint's tokenizer (PromptError on a bad one).
    `image`: whether rows carry an image."""
    if type(cfg.task) in OWN:
        tasks = {"": OWN[type(cfg.task)](cfg.task, "task", tokenizer, ckpt, image)}
    else:
        tasks = {name: TYPES[type(q)](q, f"task.questions.{name}" if name else "task", tokenizer, template)
                 for name, q in named_questions(cfg.task).items()}
    qs = Questions(tasks)
    qs.check_names([cfg.input.id_column, *cfg.input.columns])
    return qs
