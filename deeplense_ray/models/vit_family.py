"""Thin wrappers over vit-pytorch models, sized for 64x64 / 150x150 single-channel lens images.

Each builder takes ``(image_size, in_channels, num_classes, hp)`` (``hp``: the resolved hyperparameters) and
returns a module mapping [B, C, H, W] -> logits [B, num_classes]. How each handles the image size:

- ViT, ViTSD, CaiT, CrossViT, PiT: patch sizes that divide the image (64 -> 8, 150 -> 10; CrossViT's large
  patches 16 / 25); no padding. CaiT and LeViT hard-code 3 input channels: a single channel is repeated.
- CvT, CCT, T2TViT: convolutional tokenizers, any size >= 16 (no padding).
- LeViT: needs a multiple of 16 -> centre zero-padding (150 -> 160).
- TwinsSVT, CrossFormer: need a multiple of 32 -> centre zero-padding (150 -> 160), window sizes chosen to
  divide every stage's feature map.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._common import Adapted, InputAdapter, divisors, patch_plan, round_up
from ._vitlib import import_vit_module

CaiT = import_vit_module("cait").CaiT
CCT = import_vit_module("cct").CCT
CrossViT = import_vit_module("cross_vit").CrossViT
CrossFormer = import_vit_module("crossformer").CrossFormer
CvT = import_vit_module("cvt").CvT
LeViT = import_vit_module("levit").LeViT
PiT = import_vit_module("pit").PiT
T2TViT = import_vit_module("t2t").T2TViT
TwinsSVT = import_vit_module("twins_svt").TwinsSVT
ViT = import_vit_module("vit").ViT
ViTSmallDataset = import_vit_module("vit_for_small_dataset").ViT


def _adapter(image_size: int, padded: int, in_channels: int, out_channels: int) -> InputAdapter:
    return InputAdapter(
        image_size=image_size, padded_size=padded, in_channels=in_channels, out_channels=out_channels
    )


def _vit_kwargs(hp: dict[str, Any]) -> dict[str, Any]:
    keys = ("dim", "depth", "heads", "mlp_dim", "dim_head", "dropout", "emb_dropout", "pool")
    return {k: hp[k] for k in keys if k in hp}


def build_vit(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded, p = patch_plan(image_size, hp.get("patch_size"))
    net = ViT(
        image_size=padded, patch_size=p, num_classes=num_classes, channels=in_channels, **_vit_kwargs(hp)
    )
    return Adapted(_adapter(image_size, padded, in_channels, in_channels), net)


def build_vitsd(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded, p = patch_plan(image_size, hp.get("patch_size"))
    net = ViTSmallDataset(
        image_size=padded, patch_size=p, num_classes=num_classes, channels=in_channels, **_vit_kwargs(hp)
    )
    return Adapted(_adapter(image_size, padded, in_channels, in_channels), net)


def build_cait(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded, p = patch_plan(image_size, hp.get("patch_size"))
    keys = (
        "dim",
        "depth",
        "cls_depth",
        "heads",
        "mlp_dim",
        "dim_head",
        "dropout",
        "emb_dropout",
        "layer_dropout",
    )
    net = CaiT(image_size=padded, patch_size=p, num_classes=num_classes, **{k: hp[k] for k in keys})
    return Adapted(_adapter(image_size, padded, in_channels, 3), net)  # CaiT hard-codes 3 channels


def build_cvt(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    kw = {k: v for k, v in hp.items() if k[:3] in ("s1_", "s2_", "s3_")}
    net = CvT(num_classes=num_classes, channels=in_channels, dropout=hp["dropout"], **kw)
    return Adapted(_adapter(image_size, image_size, in_channels, in_channels), net)


def build_cct(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    k = hp["kernel_size"]
    n_conv = hp.get("n_conv_layers")
    if n_conv is None:  # smallest number of /2 tokenizer layers giving a token grid <= 20 per side
        n_conv, side = 1, -(-image_size // 2)
        while side > 20:
            n_conv, side = n_conv + 1, -(-side // 2)
    net = CCT(
        img_size=image_size,
        embedding_dim=hp["embedding_dim"],
        n_input_channels=in_channels,
        n_conv_layers=n_conv,
        kernel_size=k,
        stride=max(1, k // 2 - 1),
        padding=max(1, k // 2),
        pooling_kernel_size=3,
        pooling_stride=2,
        pooling_padding=1,
        num_layers=hp["num_layers"],
        num_heads=hp["num_heads"],
        mlp_ratio=hp["mlp_ratio"],
        num_classes=num_classes,
        dropout_rate=hp["dropout"],
        attention_dropout=hp["attention_dropout"],
        stochastic_depth_rate=hp["stochastic_depth_rate"],
        positional_embedding="learnable",
    )
    return Adapted(_adapter(image_size, image_size, in_channels, in_channels), net)


def _largest_window(fmap: int, cap: int = 7) -> int:
    return max(divisors(fmap, lo=1, hi=min(cap, fmap)))


def build_twins_svt(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded = round_up(image_size, 32)
    # patch sizes 4, 2, 2, 2: stage maps padded/4, /8, /16, /32; local windows must divide stages 1-3
    w = _largest_window(padded // 16)
    kw: dict[str, Any] = {}
    for s in range(1, 5):
        kw[f"s{s}_emb_dim"] = hp[f"s{s}_emb_dim"]
        kw[f"s{s}_depth"] = hp[f"s{s}_depth"]
        kw[f"s{s}_local_patch_size"] = w
        # key/value sub-sampling of the global attention: a stride-gk conv with dim*2*inner*gk^2 weights
        kw[f"s{s}_global_k"] = min(w, max(1, padded // (4 * 2 ** (s - 1)) // 8))
    net = TwinsSVT(num_classes=num_classes, dropout=hp["dropout"], **kw)
    return Adapted(_adapter(image_size, padded, in_channels, 3), net)  # TwinsSVT hard-codes 3 channels


def build_levit(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded = round_up(image_size, 16)
    net = LeViT(
        image_size=padded,
        num_classes=num_classes,
        dim=tuple(hp["dim"]),
        depth=hp["depth"],
        heads=tuple(hp["heads"]),
        mlp_mult=hp["mlp_mult"],
        stages=len(hp["dim"]),
        dim_key=hp["dim_key"],
        dim_value=hp["dim_value"],
        dropout=hp["dropout"],
    )
    return Adapted(_adapter(image_size, padded, in_channels, 3), net)  # LeViT hard-codes 3 channels


def build_cross_vit(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded, sm = patch_plan(image_size, hp.get("sm_patch_size"))
    lg = hp.get("lg_patch_size")
    if lg is None:
        lg = min([d for d in divisors(padded, lo=2 * sm) if padded // d >= 2] or [sm])
    elif padded % lg:
        raise ValueError(
            f"lg_patch_size={lg} does not divide image_size={padded}; "
            f"valid: {divisors(padded, lo=2, hi=padded // 2)}"
        )
    keys = (
        "sm_dim", "lg_dim", "sm_enc_depth", "sm_enc_heads", "sm_enc_mlp_dim", "lg_enc_depth", "lg_enc_heads",
        "lg_enc_mlp_dim", "cross_attn_depth", "cross_attn_heads", "depth", "dropout", "emb_dropout",
    )  # fmt: skip
    net = CrossViT(
        image_size=padded, num_classes=num_classes, sm_patch_size=sm, lg_patch_size=lg, channels=in_channels,
        **{k: hp[k] for k in keys},
    )  # fmt: skip
    return Adapted(_adapter(image_size, padded, in_channels, in_channels), net)


def build_pit(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded, p = patch_plan(image_size, hp.get("patch_size"))
    if p % 2:
        raise ValueError(f"PiT needs an even patch_size (unfold stride patch_size/2), got {p}")
    net = PiT(
        image_size=padded, patch_size=p, num_classes=num_classes, dim=hp["dim"], depth=tuple(hp["depth"]),
        heads=hp["heads"], mlp_dim=hp["mlp_dim"], dim_head=hp["dim_head"], dropout=hp["dropout"],
        emb_dropout=hp["emb_dropout"], channels=in_channels,
    )  # fmt: skip
    return Adapted(_adapter(image_size, padded, in_channels, in_channels), net)


def build_t2t(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    net = T2TViT(
        image_size=image_size, num_classes=num_classes, dim=hp["dim"], depth=hp["depth"], heads=hp["heads"],
        mlp_dim=hp["mlp_dim"], dim_head=hp["dim_head"], dropout=hp["dropout"], emb_dropout=hp["emb_dropout"],
        channels=in_channels, t2t_layers=((7, 4), (3, 2), (3, 2)),
    )  # fmt: skip
    return Adapted(_adapter(image_size, image_size, in_channels, in_channels), net)


def build_crossformer(image_size: int, in_channels: int, num_classes: int, hp: dict[str, Any]) -> nn.Module:
    padded = round_up(image_size, 32)
    fmaps = [padded // s for s in (4, 8, 16, 32)]
    local = tuple(_largest_window(f) for f in fmaps)
    glob = tuple(f // w for f, w in zip(fmaps, local))
    net = CrossFormer(
        dim=tuple(hp["dim"]), depth=tuple(hp["depth"]), global_window_size=glob, local_window_size=local,
        cross_embed_kernel_sizes=((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)), cross_embed_strides=(4, 2, 2, 2),
        num_classes=num_classes, attn_dropout=hp["attn_dropout"], ff_dropout=hp["ff_dropout"],
        channels=in_channels,
    )  # fmt: skip
    return Adapted(_adapter(image_size, padded, in_channels, in_channels), net)
