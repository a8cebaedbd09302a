"""Model registry: name -> builder, tunable hyperparameters, the ``comparable`` size, provenance notes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from . import vit_family as vf
from ._common import MIN_IMAGE_SIZE
from .lensiformer import Lensiformer
from .resnet import ResNet18, ResNetSimple
from .sis_autoencoder import SISAutoencoder
from .swin import Swin

Builder = Callable[[int, int, int, "float | None", dict[str, Any]], nn.Module]

SIZES = ("default", "comparable")


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    Attributes:
        name: canonical name (lookup is case-insensitive).
        build: ``(image_size, in_channels, num_classes, pixel_scale, hp) -> nn.Module``.
        hparams: tunable override keys and their defaults (the ``default`` size).
        comparable: overrides giving the ~13M-parameter, 2-transformer-block ``comparable`` size (or None).
        extra_keys: further accepted override keys that are not tuned (e.g. patch sizes; default None = auto).
        source: where the implementation comes from.
        size_rule: how image sizes are handled.
    """

    name: str
    build: Builder
    hparams: Mapping[str, Any]
    comparable: Mapping[str, Any] | None = None
    extra_keys: tuple[str, ...] = ()
    source: str = "own code"
    size_rule: str = ""
    notes: str = ""
    _frozen: bool = field(default=True, repr=False)


def _lib(builder: Callable[[int, int, int, dict[str, Any]], nn.Module]) -> Builder:
    def build(
        image_size: int, in_channels: int, num_classes: int, pixel_scale: float | None, hp: dict
    ) -> nn.Module:
        return builder(image_size, in_channels, num_classes, hp)

    return build


def _own(cls: type[nn.Module], *, uses_pixel_scale: bool = False, uses_image_size: bool = True) -> Builder:
    def build(
        image_size: int, in_channels: int, num_classes: int, pixel_scale: float | None, hp: dict
    ) -> nn.Module:
        extra: dict[str, Any] = {"pixel_scale": pixel_scale} if uses_pixel_scale else {}
        if uses_image_size:
            extra["image_size"] = image_size
        hp = {k: v for k, v in hp.items() if v is not None or k != "patch_size"}
        return cls(in_channels=in_channels, num_classes=num_classes, **extra, **hp)

    return build


_VIT_HP = {
    "dim": 256,
    "depth": 6,
    "heads": 8,
    "dim_head": 32,
    "mlp_dim": 512,
    "dropout": 0.1,
    "emb_dropout": 0.1,
}
# ~13M parameters, 2 transformer blocks (Lensiformer study); counts in docs/models.md
_VIT_COMPARABLE = {"dim": 768, "depth": 2, "heads": 12, "dim_head": 64, "mlp_dim": 2688}
_PATCH_RULE = "patch size divides the image (auto: 64 -> 8, 150 -> 10); no padding"

_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="ViT",
        build=_lib(vf.build_vit),
        hparams=_VIT_HP,
        comparable=_VIT_COMPARABLE,
        extra_keys=("patch_size", "pool"),
        source="vit-pytorch vit.ViT",
        size_rule=_PATCH_RULE,
    ),
    ModelSpec(
        name="ViTSD",
        build=_lib(vf.build_vitsd),
        hparams=_VIT_HP,
        comparable=_VIT_COMPARABLE,
        extra_keys=("patch_size", "pool"),
        source="vit-pytorch vit_for_small_dataset.ViT (SPT + LSA)",
        size_rule=_PATCH_RULE,
    ),
    ModelSpec(
        name="CvT",
        build=_lib(vf.build_cvt),
        hparams={
            "s1_emb_dim": 64,
            "s1_depth": 1,
            "s1_heads": 1,
            "s2_emb_dim": 192,
            "s2_depth": 2,
            "s2_heads": 3,
            "s3_emb_dim": 384,
            "s3_depth": 4,
            "s3_heads": 6,
            "dropout": 0.1,
        },  # fmt: skip
        comparable={
            "s1_depth": 0,
            "s2_emb_dim": 384,
            "s2_depth": 1,
            "s2_heads": 6,
            "s3_emb_dim": 832,
            "s3_depth": 1,
            "s3_heads": 13,
        },  # fmt: skip
        source="vit-pytorch cvt.CvT",
        size_rule="convolutional token embedding (strides 4, 2, 2): any size >= 16; no padding",
        notes="comparable: stage-1 transformer depth 0, one block in stages 2 and 3",
    ),
    ModelSpec(
        name="CaiT",
        build=_lib(vf.build_cait),
        hparams={**_VIT_HP, "cls_depth": 2, "layer_dropout": 0.0},
        comparable={"dim": 768, "depth": 2, "cls_depth": 1, "heads": 12, "dim_head": 64, "mlp_dim": 1248},
        extra_keys=("patch_size",),
        source="vit-pytorch cait.CaiT",
        size_rule=_PATCH_RULE + "; 1 channel repeated to the 3 CaiT hard-codes",
        notes="comparable: 2 self-attention blocks + 1 class-attention block",
    ),
    ModelSpec(
        name="Lensiformer",
        build=_own(Lensiformer, uses_pixel_scale=True),
        hparams={
            "dim": 256,
            "depth": 4,
            "heads": 8,
            "dim_head": 32,
            "mlp_dim": 512,
            "encoder_dim": 128,
            "encoder_depth": 2,
            "encoder_heads": 4,
            "encoder_mlp_dim": 256,
            "dropout": 0.1,
            "emb_dropout": 0.1,
            "theta_E": 1.2,
            "k_saturation": 0.2,
        },  # fmt: skip
        comparable={
            "dim": 768,
            "depth": 2,
            "heads": 12,
            "dim_head": 64,
            "mlp_dim": 2368,
            "encoder_dim": 256,
            "encoder_depth": 1,
            "encoder_heads": 4,
            "encoder_mlp_dim": 512,
        },  # fmt: skip
        extra_keys=("patch_size",),
        source="own code on vit-pytorch SPT / LSA parts",
        size_rule=_PATCH_RULE,
        notes="uses pixel_scale [arcsec/pixel] (default 0.101); comparable: 2 decoder blocks + 1 k-encoder "
        "block",
    ),
    ModelSpec(
        name="CCT",
        build=_lib(vf.build_cct),
        hparams={
            "embedding_dim": 256,
            "num_layers": 6,
            "num_heads": 4,
            "mlp_ratio": 2.0,
            "kernel_size": 3,
            "dropout": 0.0,
            "attention_dropout": 0.1,
            "stochastic_depth_rate": 0.1,
        },  # fmt: skip
        extra_keys=("n_conv_layers",),
        source="vit-pytorch cct.CCT",
        size_rule="convolutional tokenizer (conv + max-pool layers, /2 each; auto count so the token grid is "
        "<= 20 per side: 64 -> 2 layers, 16x16 tokens; 150 -> 3 layers, 19x19): any size >= 16; no padding",
    ),
    ModelSpec(
        name="TwinsSVT",
        build=_lib(vf.build_twins_svt),
        hparams={
            "s1_emb_dim": 64,
            "s1_depth": 1,
            "s2_emb_dim": 128,
            "s2_depth": 1,
            "s3_emb_dim": 256,
            "s3_depth": 2,
            "s4_emb_dim": 256,
            "s4_depth": 1,
            "dropout": 0.1,
        },  # fmt: skip
        source="vit-pytorch twins_svt.TwinsSVT",
        size_rule="centre zero-pad to a multiple of 32 (150 -> 160); window = largest <= 7 dividing the "
        "stage-3 "
        "map (64 -> 4, 160 -> 5); 1 channel repeated to 3",
    ),
    ModelSpec(
        name="LeViT",
        build=_lib(vf.build_levit),
        hparams={
            "dim": (128, 256, 384),
            "depth": 4,
            "heads": (4, 6, 8),
            "mlp_mult": 2,
            "dim_key": 32,
            "dim_value": 64,
            "dropout": 0.1,
        },  # fmt: skip
        source="vit-pytorch levit.LeViT",
        size_rule="centre zero-pad to a multiple of 16 (150 -> 160); 1 channel repeated to 3",
    ),
    ModelSpec(
        name="CrossViT",
        build=_lib(vf.build_cross_vit),
        hparams={
            "sm_dim": 128,
            "lg_dim": 256,
            "sm_enc_depth": 1,
            "sm_enc_heads": 4,
            "sm_enc_mlp_dim": 256,
            "lg_enc_depth": 2,
            "lg_enc_heads": 4,
            "lg_enc_mlp_dim": 512,
            "cross_attn_depth": 1,
            "cross_attn_heads": 4,
            "depth": 2,
            "dropout": 0.1,
            "emb_dropout": 0.1,
        },  # fmt: skip
        extra_keys=("sm_patch_size", "lg_patch_size"),
        source="vit-pytorch cross_vit.CrossViT",
        size_rule="small / large patches divide the image (64: 8 / 16, 150: 10 / 25); no padding",
    ),
    ModelSpec(
        name="PiT",
        build=_lib(vf.build_pit),
        hparams={
            "dim": 128,
            "depth": (2, 2, 2),
            "heads": 4,
            "mlp_dim": 256,
            "dim_head": 32,
            "dropout": 0.1,
            "emb_dropout": 0.1,
        },  # fmt: skip
        extra_keys=("patch_size",),
        source="vit-pytorch pit.PiT",
        size_rule=_PATCH_RULE + " (overlapping, stride patch/2)",
    ),
    ModelSpec(
        name="Swin",
        build=_own(Swin),
        hparams={"dim": 64, "depths": (2, 2, 4, 2), "heads": (2, 4, 8, 16), "mlp_ratio": 4.0, "dropout": 0.1},
        source="own code (timm unavailable)",
        size_rule="centre zero-pad to a multiple of 32 (150 -> 160); window 4 at 64, 5 at 160",
    ),
    ModelSpec(
        name="T2TViT",
        build=_lib(vf.build_t2t),
        hparams={
            "dim": 256,
            "depth": 4,
            "heads": 4,
            "mlp_dim": 512,
            "dim_head": 64,
            "dropout": 0.1,
            "emb_dropout": 0.1,
        },  # fmt: skip
        source="vit-pytorch t2t.T2TViT",
        size_rule="tokens-to-token unfolds (7/4, 3/2, 3/2): any size >= 16 (64 -> 4x4, 150 -> 10x10 tokens)",
    ),
    ModelSpec(
        name="CrossFormer",
        build=_lib(vf.build_crossformer),
        hparams={"dim": (64, 128, 256, 512), "depth": (1, 1, 4, 1), "attn_dropout": 0.1, "ff_dropout": 0.1},
        source="vit-pytorch crossformer.CrossFormer",
        size_rule="centre zero-pad to a multiple of 32 (150 -> 160); local window = largest <= 7 "
        "dividing each "
        "stage map, global = map / local",
    ),
    ModelSpec(
        name="ResNet18",
        build=_own(ResNet18, uses_image_size=False),
        hparams={"width": 64, "dropout": 0.0},
        source="own code (torchvision unusable here)",
        size_rule="convolutional: any size >= 16",
    ),
    ModelSpec(
        name="ResNetSimple",
        build=_own(ResNetSimple, uses_image_size=False),
        hparams={"width": 32, "dropout": 0.0},
        source="own code (PINN study's light classifier)",
        size_rule="convolutional: any size >= 16",
    ),
    ModelSpec(
        name="SISAutoencoder",
        build=_own(SISAutoencoder, uses_pixel_scale=True),
        hparams={
            "ae_width": 16,
            "classifier": "resnet_simple",
            "classifier_width": 32,
            "dropout": 0.0,
            "theta_E": 1.2,
            "k_saturation": 0.2,
        },  # fmt: skip
        source="own code (PINN study)",
        size_rule="centre zero-pad to a multiple of 8 (150 -> 152)",
        notes="uses pixel_scale [arcsec/pixel] (default 0.101)",
    ),
)

MODEL_SPECS: Mapping[str, ModelSpec] = MappingProxyType({s.name: s for s in _SPECS})
_BY_LOWER = {s.name.lower(): s for s in _SPECS}


def list_models() -> list[str]:
    """Canonical names of every registered model."""
    return [s.name for s in _SPECS]


TIMM_PREFIX = "timm:"


class _TimmClassifier(nn.Module):
    """A timm backbone without its head (``num_classes=0``: pooled features) + this project's classifier head
    (dropout, linear), as ResNet18's."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(int(backbone.num_features), num_classes))

    def forward(self, x):
        return self.head(self.backbone(x))


def _timm_spec(name: str) -> ModelSpec:
    """Spec of ``timm:<architecture>`` (any timm model, untrained, ``in_chans`` = the data's channels).

    ValueError naming the model when timm is not importable or does not know the architecture."""
    arch = name[len(TIMM_PREFIX) :].strip()
    if not arch:
        raise ValueError(f"model {name!r}: give a timm architecture after 'timm:', e.g. timm:densenet201")
    try:
        import timm
    except Exception as exc:  # ImportError, or a timm that cannot import beside this torch
        raise ValueError(
            f"model {name!r} needs timm, which is not importable here ({type(exc).__name__}: {exc}); install "
            f"timm matching this torch, or use one of: {', '.join(list_models())}"
        ) from exc
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:10]
        raise ValueError(f"model {name!r}: timm has no architecture {arch!r}; similar names: {close}")

    def build(image_size: int, in_channels: int, num_classes: int, pixel_scale: float | None, hp: dict):
        hp = dict(hp)
        dropout = float(hp.pop("dropout"))
        backbone = timm.create_model(arch, pretrained=False, in_chans=in_channels, num_classes=0, **hp)
        return _TimmClassifier(backbone, num_classes, dropout)

    return ModelSpec(
        name=f"{TIMM_PREFIX}{arch}",
        build=build,
        hparams={"dropout": 0.0, "drop_rate": 0.0},
        source=f"timm {arch} (pretrained=False) + own head",
        size_rule="timm's own",
    )


def get_spec(name: str) -> ModelSpec:
    """Spec for ``name`` (case-insensitive; ``timm:<arch>`` = any timm architecture where timm is importable);
    ValueError listing valid names if unknown."""
    if isinstance(name, str) and name.lower().startswith(TIMM_PREFIX):
        return _timm_spec(name)
    spec = _BY_LOWER.get(str(name).lower()) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return spec


def model_hparams(name: str) -> dict[str, object]:
    """Tunable override keys of ``name`` and their defaults (the ``default`` size)."""
    return dict(get_spec(name).hparams)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


#: Types of the override keys without a default in ``hparams`` (``extra_keys``); None means automatic.
EXTRA_KEY_TYPES: Mapping[str, type] = MappingProxyType(
    {"patch_size": int, "pool": str, "n_conv_layers": int, "sm_patch_size": int, "lg_patch_size": int}
)
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a name"}


def _typed(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (an integral float counts as an integer, an integer as a number), or a
    ValueError without context (the caller names the model and the key)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(_TYPE_WORDS.get(kind, kind.__name__))
    return value


def check_override(name: str, key: str, value: Any) -> Any:
    """``value`` checked against the type of ``key``'s constructor parameter of model ``name`` (the type of
    its default: an integer, a number, true/false, a name, or a list of integers for the per-stage keys);
    returns it (an integral float as an integer, a list as a tuple). ValueError naming the model, the key
    and the value; an unknown key lists the valid ones."""
    spec = get_spec(name)
    if key in spec.hparams:
        default = spec.hparams[key]
    elif key in spec.extra_keys:
        if value is None or key not in EXTRA_KEY_TYPES:
            return value  # None: chosen from the image size
        default = EXTRA_KEY_TYPES[key]()
    else:
        valid = sorted(set(spec.hparams) | set(spec.extra_keys))
        raise ValueError(f"unknown override {key!r} for model {spec.name!r}; valid keys: {', '.join(valid)}")
    try:
        if isinstance(default, tuple):
            if not isinstance(value, (tuple, list)) or not value:
                raise ValueError(f"a list of {type(default[0]).__name__}s, e.g. {list(default)}")
            return tuple(_typed(v, type(default[0])) for v in value)
        return _typed(value, type(default))
    except ValueError as exc:
        raise ValueError(
            f"model {spec.name!r}: override {key}={value!r} must be {exc} (default {default!r})"
        ) from None


def resolve_hparams(name: str, size: str = "default", **overrides: Any) -> dict[str, Any]:
    """Defaults of ``size`` updated by ``overrides``; ValueError for an unknown size, an unknown override key
    or a value of the wrong type (:func:`check_override`)."""
    spec = get_spec(name)
    if size not in SIZES:
        raise ValueError(f"size={size!r}; valid sizes: {', '.join(SIZES)}")
    if size == "comparable" and spec.comparable is None:
        valid = [s.name for s in _SPECS if s.comparable is not None]
        raise ValueError(f"model {spec.name!r} has no 'comparable' size; models that do: {', '.join(valid)}")
    allowed = set(spec.hparams) | set(spec.extra_keys)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for model {spec.name!r}; valid keys: {', '.join(sorted(allowed))}"
        )
    hp: dict[str, Any] = dict(spec.hparams)
    if size == "comparable":
        hp.update(spec.comparable or {})
    hp.update({k: check_override(spec.name, k, v) for k, v in overrides.items()})
    return hp


def check_image_size(image_size: object) -> int:
    """Validate a square image side [pixels]; ValueError naming the value and what is allowed."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size!r} is not supported; valid: an integer >= {MIN_IMAGE_SIZE} "
            "(square images, "
            "e.g. 64 or 150)"
        )
    return image_size


def build_model(
    name: str,
    image_size: int,
    in_channels: int,
    num_classes: int,
    *,
    pixel_scale: float | None = None,
    size: str = "default",
    **overrides: Any,
) -> nn.Module:
    """Build model ``name`` for square ``image_size`` x ``image_size`` images with ``in_channels`` channels.

    Args:
        name: case-insensitive, one of :func:`list_models`.
        image_size: image side [pixels], >= 16.
        in_channels: input channels (1 for the lens images).
        num_classes: output logits, >= 2.
        pixel_scale: [arcsec/pixel] of the data; used by Lensiformer and SISAutoencoder (default 0.101),
            ignored by the others.
        size: ``"default"`` or ``"comparable"`` (~13M parameters, 2 transformer blocks; ViT, ViTSD, CvT, CaiT,
            Lensiformer).
        overrides: hyperparameters (keys of :func:`model_hparams` plus e.g. ``patch_size``).
    Returns:
        module mapping float32 [B, in_channels, image_size, image_size] to logits [B, num_classes].
    """
    spec = get_spec(name)
    image_size = check_image_size(image_size)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r}; valid: an integer >= 1")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; valid: an integer >= 2")
    if pixel_scale is not None and not (isinstance(pixel_scale, (int, float)) and pixel_scale > 0):
        raise ValueError(f"pixel_scale={pixel_scale!r}; valid: a positive number [arcsec/pixel] or None")
    hp = resolve_hparams(spec.name, size, **overrides)
    try:
        return spec.build(image_size, in_channels, num_classes, pixel_scale, hp)
    except (AssertionError, RuntimeError) as err:  # library asserts -> a clear error naming the inputs
        raise ValueError(
            f"model {spec.name!r} cannot be built for image_size={image_size}, in_channels={in_channels} "
            "with "
            f"hyperparameters {hp}: {err}"
        ) from err


def parameter_report(
    image_sizes: tuple[int, ...] = (64, 150), *, in_channels: int = 1, num_classes: int = 3
) -> list[dict[str, Any]]:
    """Parameter counts for every model, image size and size preset (``comparable`` where defined)."""
    rows = []
    for spec in _SPECS:
        for size in SIZES:
            if size == "comparable" and spec.comparable is None:
                continue
            row: dict[str, Any] = {"model": spec.name, "size": size, "source": spec.source}
            for n in image_sizes:
                row[f"params_{n}"] = count_parameters(
                    build_model(spec.name, n, in_channels, num_classes, size=size)
                )
            rows.append(row)
    return rows
