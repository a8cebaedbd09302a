"""Model zoo tests: every model builds, trains a step and learns at 64x64 and 150x150; Lensiformer physics.

The SIS reference images are rendered with lenstronomy (independent of deeplense_ray.sim).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deeplense_ray.models import (
    DEFAULT_PIXEL_SCALE,
    InverseLensLayer,
    build_model,
    count_parameters,
    list_models,
    model_hparams,
    parameter_report,
    resolve_hparams,
)
from deeplense_ray.models.lensing import bilinear_splat, pixel_grid, sis_source_positions

EXPECTED = [
    "ViT", "ViTSD", "CvT", "CaiT", "Lensiformer", "CCT", "TwinsSVT", "LeViT", "CrossViT", "PiT", "Swin",
    "T2TViT", "CrossFormer", "ResNet18", "ResNetSimple", "SISAutoencoder",
]  # fmt: skip

# small overrides so the 'loss falls' test is fast on 2 CPU cores (the architecture is unchanged)
SMALL: dict[str, dict] = {
    "ViT": {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
    "ViTSD": {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
    "CvT": {
        "s1_emb_dim": 32,
        "s2_emb_dim": 64,
        "s2_depth": 1,
        "s3_emb_dim": 96,
        "s3_depth": 1,
        "s3_heads": 2,
    },
    "CaiT": {"dim": 64, "depth": 2, "cls_depth": 1, "heads": 4, "mlp_dim": 128},
    "Lensiformer": {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "encoder_dim": 32, "encoder_depth": 1},
    "CCT": {"embedding_dim": 64, "num_layers": 2, "num_heads": 2},
    "TwinsSVT": {"s1_emb_dim": 32, "s2_emb_dim": 32, "s3_emb_dim": 64, "s3_depth": 1, "s4_emb_dim": 64},
    "LeViT": {"dim": (32, 64, 96), "depth": 1, "heads": (2, 2, 2)},
    "CrossViT": {"sm_dim": 32, "lg_dim": 64, "lg_enc_depth": 1, "depth": 1},
    "PiT": {"dim": 32, "depth": (1, 1, 1), "heads": 2, "mlp_dim": 64},
    "Swin": {"dim": 32, "depths": (1, 1, 1, 1), "heads": (1, 2, 2, 4)},
    "T2TViT": {"dim": 64, "depth": 2, "heads": 2, "mlp_dim": 128},
    "CrossFormer": {"dim": (32, 32, 64, 64), "depth": (1, 1, 1, 1)},
    "ResNet18": {"width": 16},
    "ResNetSimple": {"width": 16},
    "SISAutoencoder": {"ae_width": 8, "classifier_width": 16},
}


def _no_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout / drop-path probability so a tiny-batch loss is deterministic."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def test_registry_names_case_insensitive() -> None:
    assert list_models() == EXPECTED
    a = build_model("vit", 64, 1, 2, **SMALL["ViT"])
    b = build_model("VIT", 64, 1, 2, **SMALL["ViT"])
    assert count_parameters(a) == count_parameters(b) > 0
    for name in EXPECTED:
        hp = model_hparams(name.lower())
        assert hp and all(isinstance(k, str) for k in hp)
    assert {"dim", "depth", "heads", "mlp_dim", "dropout", "emb_dropout"} <= set(model_hparams("ViT"))


# the heaviest default models (> 10 s on 2 busy cores) carry the slow marker; they still run in CI
_HEAVY = {"TwinsSVT", "CrossFormer", "Swin", "T2TViT"}
_NAMES_MARKED = [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in EXPECTED]


@pytest.mark.parametrize("image_size", [64, 150])
@pytest.mark.parametrize("name", _NAMES_MARKED)
def test_default_model_forward_backward(name: str, image_size: int) -> None:
    """Default size, 1 channel, 2 and 3 classes: output shape, finite loss, gradients on all parameters."""
    torch.manual_seed(0)
    model = build_model(name, image_size, 1, 3, **model_hparams(name))  # tunable keys round-trip
    x = torch.randn(2, 1, image_size, image_size)
    logits = model(x)
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    two = build_model(name, image_size, 1, 2).eval()
    with torch.no_grad():
        assert two(x[:1]).shape == (1, 2)


# Adam learning rates for the 'loss falls' test (1e-3 unless listed; these learn slowly at 1e-3)
LOSS_LR = {"CaiT": 3e-3, "CCT": 3e-3, "LeViT": 1e-2}


def _tiny_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """6 images, 3 classes: empty, an Einstein-ring-like annulus, a central blob; plus 10 % noise."""
    c = (torch.arange(n) - (n - 1) / 2) / (n / 6.4)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    patterns = torch.stack(
        [torch.zeros_like(r), torch.exp(-((r - 1.5) ** 2) / 0.1), torch.exp(-(r**2) / 0.5)]
    )
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    noise = 0.1 * torch.randn(6, 1, n, n, generator=torch.Generator().manual_seed(1))
    return patterns[y][:, None] + noise, y


def _train_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", EXPECTED)
def test_loss_falls_on_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    model = _no_dropout(build_model(name, 64, 1, 3, **SMALL[name]))
    x, y = _tiny_batch()
    losses = _train_losses(model, x, y, LOSS_LR.get(name, 1e-3), steps=8)
    assert min(losses[-3:]) < 0.8 * losses[0], f"{name}: loss did not fall: {losses}"


def test_size_150_physics_models_learn() -> None:
    """The 150x150 path (0.05 arcsec/pixel, padded for the SIS autoencoder) of the physics models learns."""
    x, y = _tiny_batch(150)
    for name in ("Lensiformer", "SISAutoencoder"):
        torch.manual_seed(0)
        model = _no_dropout(build_model(name, 150, 1, 3, pixel_scale=0.05, **SMALL[name]))
        losses = _train_losses(model, x[:3], y[:3], 1e-3, steps=5)
        # three images of three classes: a model blind to its input stays at or above ln 3 (its best constant)
        assert losses[-1] < 0.75 * math.log(3), f"{name}: {losses}"


@pytest.mark.parametrize("name", ["Lensiformer", "SISAutoencoder"])
def test_k_network_receives_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 64, 1, 2, pixel_scale=0.08, **SMALL[name])
    model(torch.randn(2, 1, 64, 64)).logsumexp(dim=1).sum().backward()
    k_params = {
        n: p
        for n, p in model.named_parameters()
        if n.startswith(("k_spt", "k_pos", "k_transformer", "k_head", "k_net"))
    }
    assert k_params
    dead = [n for n, p in k_params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"k-network parameters without gradient: {dead}"
    assert model.log_theta_E.grad is not None and model.log_theta_E.grad.abs() > 0
    assert model.inverse_lens.pixel_scale == 0.08


def test_pixel_scale_default_and_propagation() -> None:
    m = build_model("Lensiformer", 64, 1, 2, **SMALL["Lensiformer"])
    assert m.pixel_scale == DEFAULT_PIXEL_SCALE == 0.101
    m = build_model("Lensiformer", 150, 1, 2, pixel_scale=0.05, **SMALL["Lensiformer"])
    assert m.pixel_scale == 0.05
    x, _ = pixel_grid(150, 0.05)
    assert torch.allclose(m.inverse_lens.theta_x, x)


def test_k_saturation_bounds() -> None:
    m = build_model("Lensiformer", 64, 1, 2, theta_E=1.5, **SMALL["Lensiformer"])
    with torch.no_grad():
        for p in m.k_head.parameters():
            p.normal_(std=10.0)  # drive the raw output far into saturation
        _, _, k = m.reconstruct_source(torch.randn(2, 1, 64, 64))
    assert k.shape == (2, 1, 64, 64)
    assert float(k.min()) >= 1.5 * 0.8 - 1e-5 and float(k.max()) <= 1.5 * 1.2 + 1e-5
    assert float(k.max() - k.min()) > 0.3  # really saturating on both sides, not constant


def test_pixel_grid_matches_lenstronomy() -> None:
    from lenstronomy.Util.util import make_grid

    for n, d in ((64, 0.101), (150, 0.05), (7, 0.2)):
        xl, yl = make_grid(n, d)
        x, y = pixel_grid(n, d, dtype=torch.float64)
        np.testing.assert_allclose(x.numpy().ravel(), xl, atol=1e-12)
        np.testing.assert_allclose(y.numpy().ravel(), yl, atol=1e-12)


def _lenstronomy_sis_image(n: int, d: float, theta_E: float) -> tuple[np.ndarray, np.ndarray]:
    """Point-sampled SIS-lensed elliptical Sersic and the unlensed source on the same grid (lenstronomy)."""
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.util import make_grid

    xs, ys = make_grid(n, d)
    lens = LensModel(["SIS"])
    light = LightModel(["SERSIC_ELLIPSE"])
    kw_lens = [{"theta_E": theta_E, "center_x": 0.0, "center_y": 0.0}]
    kw_src = [
        {
            "amp": 10.0,
            "R_sersic": 0.5,
            "n_sersic": 1.0,
            "e1": 0.1,
            "e2": -0.05,
            "center_x": 0.15,
            "center_y": -0.1,
        }
    ]
    bx, by = lens.ray_shooting(xs, ys, kw_lens)
    image = light.surface_brightness(bx, by, kw_src).reshape(n, n)
    source = light.surface_brightness(xs, ys, kw_src).reshape(n, n)
    return image, source


@pytest.mark.parametrize(("n", "d", "theta_E"), [(64, 0.101, 1.2), (150, 0.05, 1.0)])
def test_inverse_lens_recovers_lenstronomy_source(n: int, d: float, theta_E: float) -> None:
    image, true_source = _lenstronomy_sis_image(n, d, theta_E)
    layer = InverseLensLayer(num_pix=n, pixel_scale=d)
    img = torch.tensor(image, dtype=torch.float32)[None, None]

    def rel_err(k: float) -> tuple[float, float, float]:
        src, defined = layer(img, torch.full((1, 1, n, n), k))
        m = defined[0, 0].numpy() > 0
        s = src[0, 0].numpy()[m]
        t = true_source[m]
        return float(np.abs(s - t).sum() / np.abs(t).sum()), float(np.corrcoef(s, t)[0, 1]), float(m.mean())

    err, corr, frac = rel_err(theta_E)
    assert frac > 0.3, frac
    assert corr > 0.995 and err < 0.05, (corr, err)
    # the true Einstein radius is clearly better than a 15 % wrong one
    assert err < 0.5 * min(rel_err(0.85 * theta_E)[0], rel_err(1.15 * theta_E)[0])


def test_bilinear_splat_gradcheck() -> None:
    """The splat is differentiable in the source positions (gradients reach k) and in the values."""
    n = 6
    g = torch.Generator().manual_seed(0)
    values = torch.rand(1, 1, n, n, generator=g, dtype=torch.float64, requires_grad=True)
    x, y = pixel_grid(n, 0.1, dtype=torch.float64)
    k = (0.12 + 0.05 * torch.rand(1, n, n, generator=g, dtype=torch.float64)).requires_grad_(True)

    def f(values: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bx, by = sis_source_positions(x, y, k)
        return bilinear_splat(values, bx, by, num_pix=n, delta_pix=0.1)

    assert torch.autograd.gradcheck(f, (values, k), eps=1e-7, atol=1e-5)


def test_lensiformer_bf16_autocast_cpu() -> None:
    m = build_model("Lensiformer", 64, 1, 2, **SMALL["Lensiformer"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 1, 64, 64))
    out.float().sum().backward()
    assert out.shape == (2, 2) and torch.isfinite(out.float()).all()


def test_comparable_size_about_13m_and_two_blocks() -> None:
    rows = {r["model"]: r for r in parameter_report((64,)) if r["size"] == "comparable"}
    assert sorted(rows) == sorted(["ViT", "ViTSD", "CvT", "CaiT", "Lensiformer"])
    for name, row in rows.items():
        assert 12.0e6 <= row["params_64"] <= 14.0e6, (name, row)
        hp = resolve_hparams(name, "comparable")
        blocks = hp["depth"] if "depth" in hp else hp["s1_depth"] + hp["s2_depth"] + hp["s3_depth"]
        assert blocks == 2, (name, hp)


def test_errors_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid names: ViT, ViTSD, CvT"):
        build_model("VisionMamba", 64, 1, 2)
    with pytest.raises(ValueError, match=r"image_size=8 .*>= 16"):
        build_model("ViT", 8, 1, 2)
    with pytest.raises(ValueError, match=r"image_size=64.5"):
        build_model("ResNet18", 64.5, 1, 2)
    with pytest.raises(ValueError, match=r"patch_size=7 .*valid patch sizes: \[2, 4, 8, 16, 32\]"):
        build_model("ViT", 64, 1, 2, patch_size=7)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['widht'\].*valid keys: dropout, width"):
        build_model("ResNet18", 64, 1, 2, widht=8)
    with pytest.raises(ValueError, match="valid sizes: default, comparable"):
        build_model("ViT", 64, 1, 2, size="huge")
    with pytest.raises(ValueError, match="models that do: ViT, ViTSD, CvT, CaiT, Lensiformer"):
        build_model("Swin", 64, 1, 2, size="comparable")
    with pytest.raises(ValueError, match="num_classes=1"):
        build_model("ViT", 64, 1, 1)
    with pytest.raises(ValueError, match="pixel_scale=-0.1"):
        build_model("Lensiformer", 64, 1, 2, pixel_scale=-0.1)
    with pytest.raises(ValueError, match="valid names: ViT"):
        model_hparams("nope")
