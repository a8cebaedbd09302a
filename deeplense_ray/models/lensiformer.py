"""Lensiformer (physics-informed vision transformer), differentiable version. Own code on vit-pytorch parts.

Encoder: a ViTSD-style transformer (shifted patch tokenization SPT + locality self-attention LSA, from
``vit_pytorch.vit_for_small_dataset``) reads the lensed image and predicts one raw value per pixel; a
saturation layer turns it into ``k(x, y) = theta_E (1 + 0.2 tanh(raw))`` [arcsec], within +-20 % of an SIS
Einstein-radius scale ``theta_E`` (a learned positive scalar initialised at ``theta_E``). The inverse lens
layer (:class:`~deeplense_ray.models.lensing.InverseLensLayer`) un-lenses the image with ``beta = theta - k
theta/|theta|`` on the data's pixel grid (``pixel_scale`` arcsec/pixel, lenstronomy convention) by bilinear
splatting, so gradients reach the k-network. Decoder: ``depth`` LSA blocks whose queries and keys come from
the lensed-image tokens (SPT) and whose values come from the reconstructed-source tokens (SPT); the class
token goes to a linear head.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import nn

from ._common import InputAdapter, patch_plan
from ._vitlib import import_vit_module
from .attention import fused_attention, sdpa
from .lensing import DEFAULT_PIXEL_SCALE, DEFAULT_THETA_E, InverseLensLayer, saturate_k

_vitsd = import_vit_module("vit_for_small_dataset")
SPT, FeedForward, LSATransformer = _vitsd.SPT, _vitsd.FeedForward, _vitsd.Transformer


class CrossLSA(nn.Module):
    """Locality self-attention (learned temperature, diagonal masked) with q, k from ``x`` and v from
    ``context`` (same token count)."""

    def __init__(self, *, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.temperature = nn.Parameter(torch.log(torch.tensor(dim_head**-0.5)))
        self.norm_x = nn.LayerNorm(dim)
        self.norm_c = nn.LayerNorm(dim)
        self.to_qk = nn.Linear(dim, 2 * inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k = rearrange(self.to_qk(self.norm_x(x)), "b n (t h d) -> t b h n d", t=2, h=self.heads)
        v = rearrange(self.to_v(self.norm_c(context)), "b n (h d) -> b h n d", h=self.heads)
        if fused_attention():  # the learned temperature folded into q; True = attend (off the diagonal)
            off_diagonal = ~torch.eye(q.shape[-2], device=q.device, dtype=torch.bool)
            p_drop = self.drop.p if self.training else 0.0
            out = sdpa(q * self.temperature.exp(), k, v, scale=1.0, attn_mask=off_diagonal, dropout_p=p_drop)
        else:
            dots = (q @ k.transpose(-1, -2)) * self.temperature.exp()
            eye = torch.eye(dots.shape[-1], device=dots.device, dtype=torch.bool)
            dots = dots.masked_fill(eye, -torch.finfo(dots.dtype).max)
            out = self.drop(dots.softmax(dim=-1)) @ v
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Lensiformer(nn.Module):
    """See the module docstring. Input [B, C, N, N], output logits [B, num_classes].

    Hyperparameters: ``dim, depth, heads, dim_head, mlp_dim`` (decoder), ``encoder_dim, encoder_depth,
    encoder_heads, encoder_mlp_dim`` (k-network), ``dropout, emb_dropout``, ``theta_E`` [arcsec],
    ``k_saturation`` (0.2 = +-20 %), ``patch_size`` (must divide N; default 8 at 64, 10 at 150),
    ``pixel_scale`` [arcsec/pixel].
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        pixel_scale: float | None = None,
        dim: int = 256,
        depth: int = 4,
        heads: int = 8,
        dim_head: int = 32,
        mlp_dim: int = 512,
        encoder_dim: int = 128,
        encoder_depth: int = 2,
        encoder_heads: int = 4,
        encoder_mlp_dim: int = 256,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        theta_E: float = DEFAULT_THETA_E,
        k_saturation: float = 0.2,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        pixel_scale = DEFAULT_PIXEL_SCALE if pixel_scale is None else float(pixel_scale)
        if not pixel_scale > 0:
            raise ValueError(f"pixel_scale must be > 0 arcsec/pixel, got {pixel_scale!r}")
        if not theta_E > 0:
            raise ValueError(f"theta_E must be > 0 arcsec, got {theta_E!r}")
        padded, p = patch_plan(image_size, patch_size)
        self.adapter = InputAdapter(
            image_size=image_size, padded_size=padded, in_channels=in_channels, out_channels=in_channels
        )
        self.num_pix, self.patch_size, self.k_saturation = padded, p, float(k_saturation)
        grid = padded // p
        n_tok = grid * grid
        # k-network (ViTSD-style encoder -> one raw value per pixel)
        self.k_spt = SPT(dim=encoder_dim, patch_size=p, channels=in_channels)
        self.k_pos = nn.Parameter(torch.randn(1, n_tok, encoder_dim) * 0.02)
        self.k_transformer = LSATransformer(
            encoder_dim, encoder_depth, encoder_heads, 32, encoder_mlp_dim, dropout
        )
        self.k_head = nn.Sequential(nn.LayerNorm(encoder_dim), nn.Linear(encoder_dim, p * p))
        nn.init.normal_(self.k_head[1].weight, std=1e-3)  # start near the SIS: k ~ theta_E everywhere
        nn.init.zeros_(self.k_head[1].bias)
        self.log_theta_E = nn.Parameter(torch.tensor(math.log(theta_E)))
        self.inverse_lens = InverseLensLayer(num_pix=padded, pixel_scale=pixel_scale)
        # decoder
        self.img_spt = SPT(dim=dim, patch_size=p, channels=in_channels)
        self.src_spt = SPT(dim=dim, patch_size=p, channels=in_channels)
        self.pos = nn.Parameter(torch.randn(1, n_tok + 1, dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.src_cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.emb_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CrossLSA(dim=dim, heads=heads, dim_head=dim_head, dropout=dropout),
                        FeedForward(dim, mlp_dim, dropout=dropout),
                    ]
                )  # fmt: skip
                for _ in range(depth)
            ]
        )
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    @property
    def pixel_scale(self) -> float:
        """Pixel scale [arcsec/pixel] of the inverse-lens grid."""
        return self.inverse_lens.pixel_scale

    def predict_k(self, x: torch.Tensor) -> torch.Tensor:
        """k(x, y) [arcsec], [B, 1, N, N], for a (padded) image x."""
        t = self.k_transformer(self.k_spt(x) + self.k_pos)
        raw = rearrange(
            self.k_head(t),
            "b (h w) (p1 p2) -> b 1 (h p1) (w p2)",
            h=self.num_pix // self.patch_size,
            p1=self.patch_size,
        )
        return saturate_k(raw.float(), self.log_theta_E.exp(), self.k_saturation)

    def reconstruct_source(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(source, defined_mask, k)`` for an unpadded input image [B, C, H, W]."""
        x = self.adapter(x)
        k = self.predict_k(x)
        source, defined = self.inverse_lens(x, k)
        return source, defined, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        k = self.predict_k(x)
        source, _ = self.inverse_lens(x, k)
        b = x.shape[0]
        img = torch.cat((repeat(self.cls_token, "1 n d -> b n d", b=b), self.img_spt(x)), dim=1) + self.pos
        src = (
            torch.cat((repeat(self.src_cls_token, "1 n d -> b n d", b=b), self.src_spt(source)), dim=1)
            + self.pos
        )
        h, src = self.emb_drop(img), self.emb_drop(src)
        for attn, ff in self.blocks:
            h = attn(h, src) + h
            h = ff(h) + h
        return self.head(h[:, 0])
