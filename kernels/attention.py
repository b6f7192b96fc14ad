"""Spatial attention maps and their centres (ACQ).

For a feature map ``F`` of shape ``[N, C, H, W]`` the attention map is the channel mean of
``|F|^p`` over space, normalised to sum to one per sample::

    A[n, h, w] = mean_c |F[n, c, h, w]|^p / sum_{h', w'} mean_c |F[n, c, h', w']|^p

Its centre is the attention-weighted mean position, in coordinates where the image spans
``[-1, 1]`` on both axes (``x`` left to right, ``y`` top to bottom, pixel centres)::

    centre[n] = (sum_{h,w} A[n,h,w] * x_w, sum_{h,w} A[n,h,w] * y_h)      shape [N, 2]
"""
from __future__ import annotations

import torch


def attention_map(features: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, H, W]``, non-negative, each sample summing to 1."""
    if features.dim() != 4:
        raise ValueError(f"attention_map expects [N, C, H, W], got shape {tuple(features.shape)}")
    a = features.abs().pow(p).mean(dim=1)
    return a / a.flatten(1).sum(dim=1).clamp(min=eps).view(-1, 1, 1)


def pixel_coordinates(h: int, w: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of an ``h x w`` grid of pixels in ``[-1, 1]``: (ys ``[h]``, xs ``[w]``)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 - 1
    return ys, xs


def attention_centre(att: torch.Tensor) -> torch.Tensor:
    """Centre of mass of normalised attention maps ``[N, H, W]`` -> ``[N, 2]`` as (x, y)."""
    _, h, w = att.shape
    ys, xs = pixel_coordinates(h, w, att.device, att.dtype)
    cx = (att.sum(dim=1) * xs).sum(dim=1)
    cy = (att.sum(dim=2) * ys).sum(dim=1)
    return torch.stack([cx, cy], dim=1)
