"""Parts shared by the Qwen-VL vision towers: patch coordinates, the folded patch embedding, attention blocks, mergers.

Pixels arrive as uint8 patches (N, 3*p*p) already in merge-block order (see prep/patches.py); the still image's
repetition along the temporal axis and the 1/std scale are folded into the patch-embedding matrix once at load."""

import torch
import torch.nn.functional as F
from torch import nn

from po_batch.layers.attention import varlen_attention
from po_batch.layers.compile import FUSED
from po_batch.layers.context import get_context
from po_batch.layers.fp8 import project
from po_batch.layers.norm import RMSNorm
from po_batch.layers.rotary import apply_rotary, inv_freq, vision_cos_sin
from po_batch.models.qwen_text import PACKED, Decoder, TextConfig

# transformers 4.4x checkpoints keep the tower at `visual.` and the decoder at `model.`; 4.5x+ nest both under `model.`;
# one saved as the bare *Model (an embedding model) has `visual.` and `language_model.` (and no LM head)
VL_RENAMES = [(r"^visual\.", "model.visual."), (r"^model\.(?!visual|language_model)", "model.language_model."),
              (r"^language_model\.", "model.language_model.")]


# The towers' work outside their blocks -- the patches' normalisation and embedding, Qwen3-VL's interpolated
# position embeddings, the rope tables, the mergers -- runs as fused graphs too (layers/compile.py) rather than as a
# dozen eager kernels over every patch, each writing float32. A switch so that benchmarks can compare both.
FUSE_ENDS = True


def fused(method, *args):
    """FUSED.call(method, *args); method(*args) with FUSE_ENDS off."""
    return FUSED.call(method, *args) if FUSE_ENDS else method(*args)


def vision_rope_theta(d: dict) -> float:
    """The vision rope's θ from a vision_config: 10000 unless rope_parameters says otherwise."""
    return float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def patch_coords(grids: torch.Tensor, merge: int, n: int) -> tuple[torch.Tensor, ...]:
    """For each of the n patches of the packed images, in merge-block order: (row, col, image height, image width)
    in patches. grids: (n_images, 3) as (t, h, w). One pass on the device, no loop over images, and no wait for
    the device: every size is given (n comes from the host)."""
    counts = grids.prod(-1)
    heights = torch.repeat_interleave(grids[:, 1], counts, output_size=n)
    widths = torch.repeat_interleave(grids[:, 2], counts, output_size=n)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts, output_size=n)
    within = (torch.arange(n, device=grids.device) - starts) % (heights * widths)
    blocks_w = widths // merge
    block, inner = within // (merge * merge), within % (merge * merge)
    rows = (block // blocks_w) * merge + inner // merge
    cols = (block % blocks_w) * merge + inner % merge
    return rows, cols, heights, widths


class PatchEmbed(nn.Module):
    """Conv3d over (temporal, p, p) patches (Conv2d over p x p ones without `temporal`: CLIP's), kept in the
    checkpoint's shape and applied as one matmul to the uint8 pixels, normalised on the device."""

    def __init__(self, channels: int, temporal: int | None, patch: int, dim: int, bias: bool):
        super().__init__()
        if temporal is None:
            self.proj = nn.Conv2d(channels, dim, patch, patch, bias=bias)
        else:
            self.proj = nn.Conv3d(channels, dim, (temporal, patch, patch), (temporal, patch, patch), bias=bias)
        self.folded_w: torch.Tensor | None = None
        self.folded_b: torch.Tensor | None = None
        self.pixel_mean: torch.Tensor | None = None

    @torch.no_grad()
    def fold(self, mean, std) -> None:
        """A still image repeats on the temporal axis, so the kernel sums over it, and the 1/(255 std) scale of the
        normalisation folds into the weights. The mean is subtracted from the pixels instead (folding it into the
        bias would make a large bias cancel a large product, which bfloat16 cannot resolve)."""
        w = self.proj.weight.float()
        w = w.sum(2) if w.dim() == 5 else w  # (dim, C, p, p)
        std = torch.tensor(std, device=w.device).view(1, -1, 1, 1)
        self.folded_w = (w / (255.0 * std)).flatten(1).to(self.proj.weight.dtype)
        self.folded_b = self.proj.bias
        mean = torch.tensor(mean, device=w.device) * 255.0
        self.pixel_mean = mean.repeat_interleave(w.shape[2] * w.shape[3])  # rows are channel-major

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear((patches.float() - self.pixel_mean).to(self.folded_w.dtype), self.folded_w, self.folded_b)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def project(self, x, cos, sin):
        q, k, v = self.qkv(x).view(-1, 3, self.heads, self.head_dim).unbind(1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module, rms: bool = False):
        super().__init__()
        norm = (lambda: RMSNorm(dim, 1e-6)) if rms else (lambda: nn.LayerNorm(dim, eps=1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(dim, heads)
        self.mlp = mlp

    def attn_in(self, x, cos, sin):
        return self.attn.project(self.norm1(x), cos, sin)

    def attn_out(self, x, o):
        x = x + project(self.attn.proj, o.flatten(1))
        return self.mlp(self.norm2(x), residual=x)  # fc2 accumulates into x + its bias (layers/residual.py)

    def forward(self, x, cos, sin, window: bool = False):
        """Full attention within each image, or within each window (Qwen2.5-VL) when `window`."""
        ctx = get_context()
        q, k, v = FUSED.call(self.attn_in, x, cos, sin)
        o = varlen_attention(q, k, v, ctx.window if window else ctx.vision, causal=False)
        return FUSED.call(self.attn_out, x, o)


class Merger(nn.Module):
    """Groups merge x merge neighbouring patches into one token: norm, then fc1 -> GELU -> fc2.
    `postshuffle` norms the concatenated group (Qwen3-VL's DeepStack mergers) instead of each patch."""

    def __init__(self, dim: int, merge: int, out: int, rms: bool = False, postshuffle: bool = False):
        super().__init__()
        self.group = dim * merge * merge
        norm_dim = self.group if postshuffle else dim
        self.norm = RMSNorm(norm_dim, 1e-6) if rms else nn.LayerNorm(norm_dim, eps=1e-6)
        self.postshuffle = postshuffle
        self.fc1 = nn.Linear(self.group, self.group)
        self.fc2 = nn.Linear(self.group, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused(self.merge, x)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.group)) if self.postshuffle else self.norm(x).view(-1, self.group)
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLanguageModel(nn.Module):
    """A vision tower feeding a Qwen decoder, laid out as the checkpoints are (model.visual, model.language_model,
    lm_head). Subclasses build the tower and define forward."""
    packed = PACKED

    def __init__(self, visual: nn.Module, text: TextConfig, image_token_id: int):
        super().__init__()
        self.model = nn.Module()
        self.model.visual = visual
        self.model.language_model = Decoder(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id = image_token_id

    def embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def window_lens(self, grids: list[tuple[int, int, int]]) -> list[int] | None:
        """Patches per attention window of the images, for towers that attend within windows (none here)."""
        return None

    def attention_lens(self, grids: list[tuple[int, int, int]]) -> tuple[list[int], list[int] | None]:
        """The tower's sequences for the images of a batch (each image whole) and its windows, on the host."""
        return [t * h * w for t, h, w in grids], self.window_lens(grids)

    def fold_pixels(self, mean, std) -> None:
        self.model.visual.patch_embed.fold(mean, std)


def rope_tables(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos/sin (N, head_dim) of the 2-D vision rope for patches at (rows, cols)."""
    return vision_cos_sin(rows, cols, inv_freq(head_dim // 2, theta, rows.device))
