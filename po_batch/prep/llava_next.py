"""LLaVA-NeXT's image processor, pixel for pixel transformers' LlavaNextImageProcessor (torchvision backend): the best
of the checkpoint's image_grid_pinpoints for the image, an aspect-keeping resize into it and a centred zero pad to
it, cut into crop x crop tiles, after the whole image squashed to one crop; and the layout of the image's tokens as
LlavaNextModel.pack_image_features builds it: the squashed image's features, then the tiles' feature grid with the
pad's rows or columns cut off again and a newline after each row."""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from po_batch.prep.image import MAX_DECODE_PIXELS, MAX_FILE_BYTES, resize
from po_batch.sample import Picture

# LlavaNextImageProcessor's class defaults (OPENAI_CLIP_MEAN/STD), where a preprocessor config leaves a key out
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class LlavaNextProcessor:
    crop: int                                 # the tower's input side in pixels (vision_config.image_size)
    patch: int                                # its patch side (vision_config.patch_size)
    pinpoints: tuple[tuple[int, int], ...]    # the tiled resolutions, (height, width), multiples of `crop`
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_decode_pixels: int = MAX_DECODE_PIXELS  # as ImageSpec's
    max_file_bytes: int = MAX_FILE_BYTES

    @classmethod
    def from_configs(cls, pre: dict, config: dict) -> "LlavaNextProcessor":
        """From preprocessor_config.json (or a processor_config.json nesting it) and config.json, refusing what
        transformers would do differently from this processor."""
        pre = pre.get("image_processor", pre)
        for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                          ("do_convert_rgb", True), ("resample", 3)):
            if pre.get(key, want) != want:
                raise ValueError(f"preprocessor config: {key}={pre[key]!r} is not supported (po-batch needs {want!r})")
        if not math.isclose(pre.get("rescale_factor", 1 / 255), 1 / 255):
            raise ValueError(f"preprocessor config: rescale_factor={pre['rescale_factor']!r} is not supported "
                             "(po-batch needs 1/255)")
        # LlavaNextConfig's tower when config.json has none, else CLIPVisionConfig's defaults for the keys it omits
        vision = config.get("vision_config") or {"image_size": 336, "patch_size": 14}
        crop, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
        size, crop_size = pre.get("size", {"shortest_edge": 224}), pre.get("crop_size", {"height": 224, "width": 224})
        sides = {size.get("shortest_edge"), *(size.get(k) for k in ("height", "width") if k in size),
                 crop_size.get("height"), crop_size.get("width")}
        if sides != {crop} or crop % patch:
            raise ValueError(f"preprocessor config: size {size} and crop_size {crop_size} must both be the vision "
                             f"tower's image_size ({crop}, a multiple of its patch_size {patch})")
        pinpoints = tuple(tuple(p) for p in pre.get("image_grid_pinpoints", PINPOINTS))
        model_pinpoints = tuple(tuple(p) for p in config.get("image_grid_pinpoints", PINPOINTS))
        if pinpoints != model_pinpoints:
            raise ValueError(f"preprocessor config: image_grid_pinpoints {[list(p) for p in pinpoints]} differ from "
                             f"config.json's {[list(p) for p in model_pinpoints]}")
        if not pinpoints or any(len(p) != 2 or min(p) < crop or p[0] % crop or p[1] % crop for p in pinpoints):
            raise ValueError(f"preprocessor config: image_grid_pinpoints {[list(p) for p in pinpoints]} must be "
                             f"(height, width) pairs of multiples of the crop size {crop}")
        return cls(crop, patch, pinpoints, tuple(float(v) for v in pre.get("image_mean", CLIP_MEAN)),
                   tuple(float(v) for v in pre.get("image_std", CLIP_STD)))

    def __call__(self, im: Image.Image) -> Picture:
        c, side = self.crop, self.crop // self.patch
        height, width = select_best_resolution(im.height, im.width, self.pinpoints)
        h, w = patch_output_size(im.height, im.width, height, width)
        tiles = np.zeros((height, width, 3), np.uint8)
        top, left = (height - h) // 2, (width - w) // 2
        tiles[top:top + h, left:left + w] = resize(im, h, w)
        crops = np.concatenate([resize(im, c, c)[None],
                                tiles.reshape(height // c, c, width // c, c, 3).swapaxes(1, 2).reshape(-1, c, c, 3)])
        layout = token_layout(im.height, im.width, height // c, width // c, side)
        n = len(layout)
        return Picture(to_patches(crops, self.patch), (len(crops), side, side),
                       np.arange(n, dtype=np.int32)[None], n, layout)

    def reference_kwargs(self) -> dict:
        return {}


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: the pinpoint that keeps most of the image's pixels
    once it is scaled to fit, and of those the one that wastes the fewest."""
    best, most, least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


def patch_output_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """transformers.image_processing_utils.get_patch_output_size: the aspect-keeping size that fits the target."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def token_layout(height: int, width: int, tiles_h: int, tiles_w: int, side: int) -> np.ndarray:
    """For each image token, the patch row whose feature it takes (patch rows: the squashed image's, then each
    tile's, side x side in raster order), -1 for a newline. The tiles' features form one grid, from which unpad_image
    cuts the rows (or columns) the centred pad added, with transformers' rounding."""
    rows, cols = tiles_h * side, tiles_w * side
    r0, r1, c0, c1 = 0, rows, 0, cols
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        r0, r1 = pad, rows - pad
    else:
        pad = (cols - int(round(width * (rows / height), 7))) // 2
        c0, c1 = pad, cols - pad
    r, c = np.arange(r0, r1)[:, None], np.arange(c0, c1)[None, :]
    tile = 1 + (r // side) * tiles_w + c // side
    grid = tile * side * side + (r % side) * side + c % side
    grid = np.concatenate([grid, np.full((r1 - r0, 1), -1)], 1)
    return np.concatenate([np.arange(side * side), grid.reshape(-1)]).astype(np.int32)


def to_patches(crops: np.ndarray, patch: int) -> np.ndarray:
    """(n, c, c, 3) uint8 -> (n * (c/p)^2, 3*p*p): each crop's patches in raster order, each row channel-major, as
    CLIP's patch-embedding convolution reads them."""
    n, c = crops.shape[:2]
    s = c // patch
    x = crops.reshape(n, s, patch, s, patch, 3).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(x).reshape(n * s * s, 3 * patch * patch)
