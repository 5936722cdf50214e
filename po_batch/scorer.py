"""Everything that turns a config into scores: the checkpoint, its tokenizer and chat template, the image
spec, the prep function for the pool and the engine. Shared by `run`, `verify` and the benchmarks."""

import json
from dataclasses import dataclass, replace

from po_batch.config import Config
from po_batch.models import loader
from po_batch.models.registry import Checkpoint, open_checkpoint
from po_batch.prep.image import ImageSpec, spec_from_preprocessor_config
from po_batch.prep.pool import Prep
from po_batch.prep.prompt import answer_ids, build_template


@dataclass
class Scorer:
    cfg: Config
    ckpt: Checkpoint
    tokenizer: object
    token_ids: list[int]
    prep: Prep
    device: str
    dtype: str
    workers: int
    identity: str
    engine: object = None

    def load(self, fuse: bool | None = None) -> None:
        """Load the weights onto the device (after everything that can fail cheaply has been checked)."""
        from po_batch.engine.runner import Engine

        spec = self.prep.spec
        self.engine = Engine(self.ckpt, self.token_ids, self.device, self.dtype, self.cfg.run.batch_tokens,
                             spec and spec.image_mean, spec and spec.image_std, fuse)


def image_spec(ckpt: Checkpoint, cfg: Config) -> ImageSpec | None:
    if not ckpt.is_vision:
        return None
    # transformers 5 saves a processor's image settings nested in processor_config.json, which the spec reads too
    source = next((f for f in (ckpt.dir / "preprocessor_config.json", ckpt.dir / "processor_config.json")
                   if f.is_file()), None)
    if source is None:
        raise loader.ModelError(f"{ckpt.dir} has no preprocessor_config.json (needed for a vision model)")
    try:
        spec = spec_from_preprocessor_config(json.loads(source.read_text()), cfg.image.min_pixels,
                                             cfg.image.max_pixels)
    except (KeyError, ValueError) as e:
        raise loader.ModelError(f"{source.name}: {e}") from None
    return replace(spec, max_decode_pixels=cfg.image.max_decode_pixels, max_file_bytes=cfg.image.max_file_bytes)


def open_scorer(cfg: Config, device: str, dtype: str, workers: int, load: bool = True) -> Scorer:
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(cfg.model.path)
    if ckpt.is_vision and cfg.input.image_column is None:
        raise loader.ModelError(f"{ckpt.dir} is a vision model: input.image_column must name the image column")
    if not ckpt.is_vision and cfg.input.image_column is not None:
        raise loader.ModelError(f"{ckpt.dir} is a text-only model: set input.image_column: null")
    tokenizer = AutoTokenizer.from_pretrained(ckpt.dir)
    token_ids = answer_ids(tokenizer, {"task.yes": cfg.task.yes, "task.no": cfg.task.no})
    spec = image_spec(ckpt, cfg)
    template = build_template(tokenizer, cfg.task.prompt, ckpt.is_vision, ckpt.config.get("image_token_id"),
                              spec.merge_size if spec else 2)
    scorer = Scorer(cfg, ckpt, tokenizer, token_ids, Prep(template, spec), device, dtype, workers,
                    loader.identity(ckpt.dir))
    if load:
        scorer.load()
    return scorer
