"""Cutting a resized uint8 image into patches in the order the Qwen-VL vision towers read them."""

import numpy as np


def to_patches(pixels: np.ndarray, patch: int, merge: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H/p * W/p, 3*p*p) uint8, rows in merge-block order (each merge x merge group of
    neighbouring patches consecutive), each row channel-major, as transformers' Qwen processors flatten them
    (minus the temporal copies of a still image, which the patch embedding folds in)."""
    h, w, c = pixels.shape
    bh, bw = h // (patch * merge), w // (patch * merge)
    x = pixels.reshape(bh, merge, patch, bw, merge, patch, c)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 4, 6, 2, 5)).reshape(bh * bw * merge * merge, c * patch * patch)
