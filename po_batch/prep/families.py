"""Each model family's side of prep, by config.json's model_type (as models/registry.py finds its model): the image
processor that turns a decoded image into what its vision tower reads, how many position axes its rope has, and what
stands for an image in a raw prompt. Torch-free: prep workers import these, never a model.

An image processor is a picklable object with `image_mean`, `image_std` (folded into the tower's patch embedding),
`max_decode_pixels`, `max_file_bytes` (prep/image.py's decode caps), `__call__(RGB PIL image) -> Picture` and
`reference_kwargs()` (what transformers' processor is given to prepare the same pixels)."""

from collections.abc import Callable
from dataclasses import dataclass

from po_batch.prep.image import spec_from_preprocessor_config
from po_batch.prep.llava_next import LlavaNextProcessor


@dataclass(frozen=True)
class FamilyPrep:
    axes: int                   # rows of a prompt's positions: 3 for M-RoPE's (t, h, w), 1 for plain rope
    placeholder: str | None     # an image in a raw prompt (task.template: raw), as the checkpoint's processor reads it
    # (preprocessor config, config.json, image.min_pixels, image.max_pixels) -> the image processor
    processor: Callable | None = None
    pixel_range: bool = False   # whether image.min_pixels / image.max_pixels mean anything to the processor


def _qwen(pre: dict, config: dict, min_pixels: int | None, max_pixels: int | None):
    return spec_from_preprocessor_config(pre, min_pixels, max_pixels)


def _llava_next(pre: dict, config: dict, min_pixels: int | None, max_pixels: int | None):
    return LlavaNextProcessor.from_configs(pre, config)


QWEN_VL = FamilyPrep(3, "<|vision_start|><|image_pad|><|vision_end|>", _qwen, pixel_range=True)
LLAVA_NEXT = FamilyPrep(1, "<image>", _llava_next)  # the image tiles to its pinpoints: no pixel range
TEXT = FamilyPrep(1, None)

FAMILIES = {"qwen2_vl": QWEN_VL, "qwen2_5_vl": QWEN_VL, "qwen3_vl": QWEN_VL, "llava_next": LLAVA_NEXT}


def family_prep(model_type: str) -> FamilyPrep:
    return FAMILIES.get(model_type, TEXT)

