"""Tasks: what is asked of each row and what it writes. One file per task type; questions.py combines them."""

from po_batch.config import Config, LabelsTask, YesNoTask, named_questions
from po_batch.prep.prompt import PromptTemplate
from po_batch.tasks.labels import Labels
from po_batch.tasks.questions import Questions
from po_batch.tasks.yes_no import YesNo

TYPES = {YesNoTask: YesNo, LabelsTask: Labels}


def build_tasks(cfg: Config, tokenizer, template: PromptTemplate) -> Questions:
    """The config's questions, their tokens resolved with the checkpoint's tokenizer (PromptError on a bad one)."""
    tasks = {name: TYPES[type(q)](q, f"task.questions.{name}" if name else "task", tokenizer, template)
             for name, q in named_questions(cfg.task).items()}
    qs = Questions(tasks)
    qs.check_names([cfg.input.id_column, *cfg.input.columns])
    return qs
