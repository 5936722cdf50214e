"""One prepared (image, prompt): what the prep pool hands the engine. Plain numpy, cheap to pickle."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    input_ids: np.ndarray                 # int32 (L,), image placeholder expanded to the image's token count
    positions: np.ndarray                 # int32 (3, L) M-RoPE positions (t, h, w); text-only rows are equal
    patches: np.ndarray | None = None     # uint8 (h*w, 3*p*p) in merge-block order, not normalised
    grid: tuple[int, int, int] | None = None  # (t, h, w) in patches

    @property
    def tokens(self) -> int:
        return len(self.input_ids)
