"""What prep is asked for each row (Question) and what it hands the engine (Sample, with its Picture's pixels). Plain
numpy, cheap to pickle.

A row is a small tree of token segments: the shared prefix (chat template and image), one segment per question
attending to the prefix, and under a question one segment per label continuation attending to both. The engine
runs every token once and reads the hidden state only at the rows each segment asks for; a sample may average
read rows into its outputs (pooled embeddings) or pick some of them, and a listwise sample holds several rows."""

from dataclasses import dataclass, field

import numpy as np

NO_TARGET = -1  # a read row whose candidate logits (and log-sum-exp) are read, with no target token of its own


@dataclass(frozen=True)
class Question:
    """What prep renders for one task of every row: the prompt text, and continuations scored token by token."""
    text: str                                   # the prompt, with {column} fields
    # (tokens fed, tokens they predict) per continuation: each fed token's row is read for its target's log-prob
    branches: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = field(default=())

    @property
    def reads(self) -> int:
        """Rows read per input row: the question's last row, then every fed token of every branch."""
        return 1 + sum(len(fed) for fed, _ in self.branches)


@dataclass
class Picture:
    """A row's image as its family's image processor prepares it (prep/families.py): what the vision tower reads, and
    how the prompt holds the image's tokens."""
    patches: np.ndarray                   # uint8 (N, 3*p*p) rows the tower's patch embedding reads, not normalised
    grid: tuple[int, int, int]            # (t, h, w): t frames (Qwen) or crops (LLaVA-NeXT) of h x w patches
    offsets: np.ndarray                   # int32 (axes, tokens) each image token's position after the image's first
    advance: int                          # how far the positions of the text after the image are ahead of its first
    layout: np.ndarray | None = None      # see Sample.layout

    @property
    def tokens(self) -> int:
        return self.offsets.shape[1]


@dataclass
class Sample:
    input_ids: np.ndarray                 # int32 (L,) the row's segments, concatenated, image placeholder expanded
    positions: np.ndarray                 # int32 (axes, L): M-RoPE's (t, h, w), or one row for plain rope
    segments: np.ndarray                  # int32 (S, 3): length, parent segment (-1: none), rows read (its last)
    targets: np.ndarray                   # int32 (O,) per output, in order: the token whose logit is read, or -1
    patches: np.ndarray | None = None     # uint8 (N, 3*p*p): the Picture's patches
    grid: tuple[int, int, int] | None = None  # (t, h, w) in patches
    # int32 (P, 2): (read row, output) pairs, each output the mean of its read rows (a row may serve several
    # outputs); None: each read row is an output of its own, in order
    outputs: np.ndarray | None = None
    rows: int = 1                         # input rows the sample scores (a listwise block holds several)
    # int32 (image tokens,) for each image token, the patch row whose tower feature it takes, or -1 where it takes the
    # family's separator embedding (LLaVA-NeXT's newline after each row of its unpadded grid); None: the tower's
    # outputs in order, one per token (Qwen)
    layout: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return len(self.input_ids)
