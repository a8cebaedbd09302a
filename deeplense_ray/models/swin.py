"""Swin Transformer (Liu et al. 2021), compact own implementation (timm is not available here).

Patch embedding 4x4, 4 stages with patch merging, windowed multi-head self-attention with a learned relative
position bias, shifted windows (with the attention mask) in every second block. The image is
centre-zero-padded to a multiple of 32 (150 -> 160) and the window size is the largest <= 7 dividing the
stage-3 map (64 -> 4, 160 -> 5); a stage whose map is not larger than the window uses one window and no shift.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ._common import InputAdapter, divisors, round_up
from .attention import fused_attention, sdpa


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*nW, w*w, C]."""
    return rearrange(x, "b (h p1) (w p2) c -> (b h w) (p1 p2) c", p1=w, p2=w)


def _unwindows(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    return rearrange(x, "(b h w) (p1 p2) c -> b (h p1) (w p2) c", h=h // w, w=wd // w, p1=w, p2=w)


class WindowAttention(nn.Module):
    def __init__(self, *, dim: int, heads: int, window: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        c = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        bias = rearrange(self.bias_table[self.rel_index], "i j h -> h i j")
        if fused_attention():
            out = self._fused(q, k, v, bias, mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn + bias
            if mask is not None:  # mask [nW, n, n], x batch is (B*nW)
                nw = mask.shape[0]
                attn = rearrange(attn, "(b w) h i j -> b w h i j", w=nw) + mask[None, :, None]
                attn = rearrange(attn, "b w h i j -> (b w) h i j")
            out = self.drop(attn.softmax(dim=-1)) @ v
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def _fused(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA with the relative position bias [h, n, n] and the shifted-window mask [nW, n, n] as one
        additive bias. With a mask the windows move onto the head axis ([(B nW), h] -> [B, (nW h)]), so the
        bias is [nW h, n, n] whatever the batch size (no copy of it per image)."""
        p_drop = self.drop.p if self.training else 0.0
        if mask is None:
            return sdpa(q, k, v, scale=self.scale, attn_mask=bias, dropout_p=p_drop)
        nw = mask.shape[0]
        q, k, v = (rearrange(t, "(b w) h n d -> b (w h) n d", w=nw) for t in (q, k, v))
        full = rearrange(bias[None] + mask[:, None], "w h i j -> (w h) i j")
        out = sdpa(q, k, v, scale=self.scale, attn_mask=full, dropout_p=p_drop)
        return rearrange(out, "b (w h) n d -> (b w) h n d", w=nw)


class SwinBlock(nn.Module):
    def __init__(
        self, *, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, heads=heads, window=window, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        img = torch.zeros(1, h, w, 1, device=device)
        cnt = 0
        ws, s = self.window, self.shift
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        ids = _windows(img, ws)[..., 0]  # [nW, n]
        diff = ids[:, None, :] - ids[:, :, None]
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, H, W, C]
        _, h, w, _ = x.shape
        y = self.norm1(x)
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self._mask(h, w, x.device).to(y.dtype)
        y = _unwindows(self.attn(_windows(y, self.window), mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b (h p1) (w p2) c -> b h w (p2 p1 c)", p1=2, p2=2)
        return self.reduce(self.norm(x))


class Swin(nn.Module):
    """Swin classifier; see the module docstring for the size rule."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        dim: int = 64,
        depths: tuple[int, ...] = (2, 2, 4, 2),
        heads: tuple[int, ...] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        patch_size: int = 4,
    ) -> None:
        super().__init__()
        n_stages = len(depths)
        mult = patch_size * 2 ** (n_stages - 1)
        padded = round_up(image_size, mult)
        self.adapter = InputAdapter(
            image_size=image_size, padded_size=padded, in_channels=in_channels, out_channels=in_channels
        )
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.embed_norm = nn.LayerNorm(dim)
        ref = padded // (patch_size * 2 ** max(0, n_stages - 2))
        window = max(divisors(ref, hi=min(7, ref)))
        stages = []
        d = dim
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            fmap = padded // (patch_size * 2**i)
            w = min(window, fmap)
            if fmap % w:
                w = max(divisors(fmap, hi=w))
            blocks = [
                SwinBlock(dim=d, heads=nh, window=w, shift=(w // 2 if (b % 2 and fmap > w) else 0),
                          mlp_ratio=mlp_ratio, dropout=dropout)
                for b in range(depth)
            ]  # fmt: skip
            merge = PatchMerging(d) if i < n_stages - 1 else nn.Identity()
            stages.append(nn.ModuleList([nn.Sequential(*blocks), merge]))
            if i < n_stages - 1:
                d *= 2
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.adapter(x))
        x = self.embed_norm(rearrange(x, "b c h w -> b h w c"))
        for blocks, merge in self.stages:
            x = merge(blocks(x))
        return self.head(self.norm(x).mean(dim=(1, 2)))
