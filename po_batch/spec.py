"""The resolved spec: everything a config means once the checkpoint is known, built once and handed down —
device, dtype, workers, the image spec, the chat template, the tasks and their token ids, the model's identity.
The results fingerprint is taken from it; nothing re-derives these values. Shared by run, verify and the benchmarks."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from po_batch.config import Config, ConfigError, EmbedTask, RerankTask, results_fingerprint
from po_batch.models import loader
from po_batch.models.registry import Checkpoint, open_checkpoint
from po_batch.prep.families import family_prep
from po_batch.prep.prompt import PromptTemplate, build_template
from po_batch.prep.row import Prep
from po_batch.tasks import build_tasks
from po_batch.tasks.questions import Questions


@dataclass
class Spec:
    cfg: Config
    ckpt: Checkpoint
    tokenizer: object       # the checkpoint's transformers tokenizer
    template: PromptTemplate | None  # None where the task writes its own prompt (rerank recipes)
    tasks: Questions
    image: object | None    # the family's image processor (prep/families.py); None for text-only rows
    device: str
    dtype: str
    workers: int
    identity: str           # config.json and every weight byte (models.loader.identity)

    @property
    def prep(self) -> Prep:
        return Prep(self.tasks.prompt(self.template), self.image, self.cfg.run.batch_tokens)

    def fingerprint(self) -> dict:
        """Everything that changes results, as flat dotted keys with JSON values (see config.results_fingerprint
        for the config's part). The image limits are the resolved ones: null in the config means the checkpoint's."""
        prompt = self.tasks.prompt(self.template)
        template = hashlib.sha256(json.dumps(prompt.fixed).encode()).hexdigest()
        tokenizer = hashlib.sha256(prompt.pieces.tokenizer.to_str().encode() if self.template is None
                                   else self.template.tokenizer.to_str().encode()).hexdigest()
        image = dataclasses.asdict(self.image) if self.image else None
        return {"model.identity": self.identity, "model.dtype": self.dtype, "model.tokenizer": tokenizer[:16],
                "model.chat_template": template[:16], **results_fingerprint(self.cfg),
                **({f"image.{k}": list(v) if isinstance(v, tuple) else v for k, v in image.items()} if image
                   else {"image": None})}

    def load_engine(self, fuse: bool | None = None):
        """Load the weights onto the device (after everything that can fail cheaply has been checked)."""
        from po_batch.engine.runner import Engine

        return Engine(self.ckpt, self.tasks.candidates, self.device, self.dtype, self.cfg.run.batch_tokens,
                      self.image and self.image.image_mean, self.image and self.image.image_std, fuse,
                      self.tasks.full_vocab, self.tasks.head, self.cfg.model.quantization)


def image_spec(ckpt: Checkpoint, cfg: Config):
    """The family's image processor for this checkpoint and config (None when rows carry no image)."""
    if not ckpt.is_vision or cfg.input.image_column is None:
        return None
    family = family_prep(ckpt.config["model_type"])
    if not family.pixel_range:
        for key in ("min_pixels", "max_pixels"):
            if getattr(cfg.image, key) is not None:
                raise ConfigError(f"image.{key}: {ckpt.config['model_type']} checkpoints tile each image to the "
                                  f"resolutions their preprocessor config lists; leave it unset")
    # transformers 5 saves a processor's image settings nested in processor_config.json, which the spec reads too
    source = next((f for f in (ckpt.dir / "preprocessor_config.json", ckpt.dir / "processor_config.json")
                   if f.is_file()), None)
    if source is None:
        raise loader.ModelError(f"{ckpt.dir} has no preprocessor_config.json (needed for a vision model)")
    try:
        spec = family.processor(json.loads(source.read_text()), ckpt.config, cfg.image.min_pixels,
                                cfg.image.max_pixels)
    except (KeyError, ValueError) as e:
        raise loader.ModelError(f"{source.name}: {e}") from None
    return dataclasses.replace(spec, max_decode_pixels=cfg.image.max_decode_pixels,
                               max_file_bytes=cfg.image.max_file_bytes)


def open_spec(cfg: Config, device: str, dtype: str, workers: int) -> Spec:
    """Resolve the config against its checkpoint: every check that needs no weights on a device."""
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(cfg.model.path)
    # embeddings and rerankers also read text-only rows with a vision model (queries, text documents)
    if ckpt.is_vision and cfg.input.image_column is None and not isinstance(cfg.task, (EmbedTask, RerankTask)):
        raise ConfigError(f"input.image_column: {ckpt.dir} is a vision model: name the image column")
    if not ckpt.is_vision and cfg.input.image_column is not None:
        raise ConfigError(f"input.image_column: {ckpt.dir} is a text-only model: set input.image_column: null")
    tokenizer = AutoTokenizer.from_pretrained(ckpt.dir)
    family = family_prep(ckpt.config["model_type"])
    image = image_spec(ckpt, cfg)
    template = None
    if not isinstance(cfg.task, RerankTask):
        template = build_template(tokenizer, image is not None, ckpt.image_token_id, family, cfg.task.system,
                                  cfg.task.template == "raw")
    tasks = build_tasks(cfg, tokenizer, template, ckpt, image is not None)
    return Spec(cfg, ckpt, tokenizer, template, tasks, image, device, dtype, workers, loader.identity(ckpt.dir))
