"""Rotary position embeddings: 1-D, multimodal M-RoPE (sectioned or interleaved), and the vision towers' 2-D rope."""

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos/sin: (T, D), broadcast over heads, in the dtype the math should run in."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


def mrope_axes(head_dim: int, section: list[int], interleaved: bool) -> torch.Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the head_dim // 2 frequencies.
    Qwen2/2.5-VL give contiguous sections; Qwen3-VL interleaves h and w into t's frequencies (t h w t h w ...)."""
    half = head_dim // 2
    j = torch.arange(half)
    if interleaved:
        axes = torch.zeros(half, dtype=torch.long)
        axes[(j % 3 == 1) & (j < 3 * section[1])] = 1
        axes[(j % 3 == 2) & (j < 3 * section[2])] = 2
        return axes
    bounds = torch.tensor([section[0], section[0] + section[1]])
    return torch.bucketize(j, bounds, right=True)


def mrope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor, axes: torch.Tensor | None, dtype):
    """positions: (3, T) for M-RoPE or (T,) for plain rope -> cos, sin of shape (T, head_dim) in `dtype`."""
    if axes is None:
        angles = positions[:, None].float() * freqs
    else:
        angles = positions[axes].float().T * freqs  # (T, half): each frequency reads its own axis
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def vision_cos_sin(rows: torch.Tensor, cols: torch.Tensor, freqs: torch.Tensor):
    """2-D rope of the vision towers: half of the rotated dims follow the patch row, half the column (float32)."""
    angles = torch.cat((rows[:, None].float() * freqs, cols[:, None].float() * freqs), dim=-1)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()
