"""Prompts written as pieces, for the recipes that fix a model card's exact prompt: control tokens (ids, the image
placeholder among them) and text. Consecutive text pieces form one run, tokenized whole, exactly as tokenizing the
card's rendered string does (a control token always splits it); the row's text in a run is text, even where it
spells a special token."""

import re
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from po_batch.prep.prompt import image_positions
from po_batch.sample import Picture

Piece = int | str


def split_controls(text: str, backend) -> list[Piece]:
    """A fixed string of a recipe's as pieces: its added tokens (<|im_start|>, <|vision_start|>, ...) as ids.
    `backend` is the checkpoint's tokenizers.Tokenizer."""
    added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    rx = re.compile("(" + "|".join(re.escape(c) for c in sorted(added, key=len, reverse=True)) + ")")
    return [added[p] if p in added else p for p in rx.split(text) if p]


@dataclass
class Pieces:
    """Picklable: sent to each prep worker with the recipe."""
    tokenizer: Tokenizer          # prompt.text_tokenizer: special tokens in text are text
    image_token_id: int | None
    axes: int = 3                 # the recipes' families (Qwen3, Qwen2-VL, Qwen3-VL) number tokens with M-RoPE

    def encode(self, pieces: list[Piece], picture: Picture | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (L,), positions (axes, L)); with `picture`, the one image placeholder becomes the image's tokens."""
        ids, run = [], []
        for p in [*pieces, None]:
            if isinstance(p, str):
                run.append(p)
                continue
            if run:
                ids += self.tokenizer.encode("".join(run), add_special_tokens=False).ids
                run = []
            if p is not None:
                ids.append(p)
        if picture is None:
            return np.array(ids, dtype=np.int32), np.broadcast_to(np.arange(len(ids), dtype=np.int32),
                                                                  (self.axes, len(ids)))
        at = ids.index(self.image_token_id)
        ids = ids[:at] + [self.image_token_id] * picture.tokens + ids[at + 1:]
        return np.array(ids, dtype=np.int32), image_positions(len(ids), at, picture)
