"""Fused attention (``torch.nn.functional.scaled_dot_product_attention``) against the einsum attention of the
original code, on the same weights, for every registered model; parameters unchanged (checkpoints load).

The einsum path stays selectable through :func:`deeplense_ray.models.attention.attention`, so both are run on
one model instance. Weights are perturbed first so that no branch is switched off at initialisation (LeViT
zero-initialises the batch norm after each attention, which would hide the attention from the logits).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from test_models import SMALL
from torch.nn.attention import SDPBackend

import deeplense_ray.models.attention as attention_module
from deeplense_ray.models import build_model, list_models
from deeplense_ray.models.attention import attention, get_attention, set_attention

# models whose attention goes through SDPA; CaiT keeps einsum (talking heads: see the vendored package's
# docstring); ResNet18, ResNetSimple and SISAutoencoder have no attention
FUSED = {
    "ViT", "ViTSD", "CvT", "Lensiformer", "CCT", "TwinsSVT", "LeViT", "CrossViT", "PiT", "Swin", "T2TViT",
    "CrossFormer",
}  # fmt: skip
# test_models' small sizes, Swin with two blocks in its first stages so that the shifted windows (and their
# attention mask) are exercised
SIZES = {**SMALL, "Swin": {**SMALL["Swin"], "depths": (2, 2, 1, 1)}}

# sha256 (first 16 hex digits) of the "key:shape" lines of each default model's state_dict, recorded from
# the einsum-only code: a checkpoint written by it loads here. Regenerate only for a deliberate architecture
# change.
STATE_DICT_FINGERPRINTS = {
    "ViT@64": "e631240d353951b8",
    "ViT@150": "289d0c921dcd8876",
    "ViTSD@64": "911418b9fe51d957",
    "ViTSD@150": "d61b23128c1291ec",
    "CvT@64": "b9cab12b30c9512c",
    "CvT@150": "b9cab12b30c9512c",
    "CaiT@64": "25dae3f5e8baf4e7",
    "CaiT@150": "b07c0653b3cec3de",
    "Lensiformer@64": "65aaf64e1ab75e48",
    "Lensiformer@150": "64489817b1f617ba",
    "CCT@64": "80dee5fbe42627a9",
    "CCT@150": "ea1752a3de8514c6",
    "TwinsSVT@64": "b1dac05456bc99ce",
    "TwinsSVT@150": "46b81df5af730eee",
    "LeViT@64": "6753e0f2e9a64fda",
    "LeViT@150": "abd38dffb1d7cdb4",
    "CrossViT@64": "a50362cf9ed72637",
    "CrossViT@150": "a9e4e0f6bf540d07",
    "PiT@64": "8eef99fa89378cc8",
    "PiT@150": "02ee0a3272075b96",
    "Swin@64": "5f4683ff36ee71e0",
    "Swin@150": "00748666a5dc8095",
    "T2TViT@64": "e242ab1a8950afbe",
    "T2TViT@150": "f0dbcb8568b16668",
    "CrossFormer@64": "7d7a9564e4ecd467",
    "CrossFormer@150": "7d7a9564e4ecd467",
    "ResNet18@64": "6137d84c51acabaa",
    "ResNet18@150": "6137d84c51acabaa",
    "ResNetSimple@64": "331407e0465946bd",
    "ResNetSimple@150": "331407e0465946bd",
    "SISAutoencoder@64": "c5e81340b95f5a48",
    "SISAutoencoder@150": "c5e81340b95f5a48",
}


def _fingerprint(model: torch.nn.Module) -> str:
    lines = [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that reach torch's SDPA from the model zoo (the real function still runs)."""
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    return calls


def _run(model: torch.nn.Module, x: torch.Tensor, impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with attention(impl):
        out = model(x)
    out.square().sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("image_size", [64, 150])
@pytest.mark.parametrize("name", list_models())
def test_sdpa_matches_einsum(name: str, image_size: int, sdpa_calls: list[int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, image_size, 1, 3, **SIZES[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 1, image_size, image_size)
    assert get_attention() == "sdpa"  # the default
    out_ref, grad_ref = _run(model, x, "einsum")
    assert not sdpa_calls, f"{name}: the einsum path called SDPA"
    out, grad = _run(model, x, "sdpa")
    assert (len(sdpa_calls) > 0) == (name in FUSED), f"{name}: {len(sdpa_calls)} SDPA calls"
    assert out_ref.abs().max() > 1e-3
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    assert grad.keys() == grad_ref.keys()
    scale = max(float(g.abs().max()) for g in grad_ref.values())
    for key, g in grad_ref.items():
        torch.testing.assert_close(
            grad[key], g, atol=1e-5 * scale, rtol=1e-3, msg=lambda m, k=key: f"{name} {k}: {m}"
        )


@pytest.mark.parametrize("name", ["LeViT", "Swin", "CrossFormer", "ViTSD"])
def test_sdpa_bias_and_mask_under_bf16_autocast(name: str) -> None:
    """Float biases (LeViT, Swin, CrossFormer) and boolean masks (LSA) under CPU bf16 autocast: the SDPA
    path runs and stays close to the fp32 einsum result."""
    torch.manual_seed(0)
    model = build_model(name, 64, 1, 3, **SIZES[name]).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad(), attention("einsum"):
        ref = model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


# LeViT's values are wider than its keys: CPU's fused kernel does not take that (CUDA's memory-efficient does)
CPU_MATH_ONLY = {"LeViT"}


@pytest.fixture
def sdpa_choices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The kernel torch dispatches each SDPA call of the model zoo to (``SDPBackend`` values; the real
    function still runs)."""
    real = F.scaled_dot_product_attention
    choices: list[int] = []

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, **kwargs):
        choices.append(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False, scale=scale))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording)
    return choices


def _assert_fused(name: str, choices: list[int]) -> None:
    math = SDPBackend.MATH.value
    assert choices and math not in choices, f"{name}: {choices.count(math)} of {len(choices)} calls unfused"


@pytest.mark.parametrize("name", sorted(FUSED - CPU_MATH_ONLY))
def test_fused_kernel_is_taken(name: str, sdpa_choices: list[int]) -> None:
    """Every SDPA call of the model is one that torch dispatches to a fused kernel, not to its unfused math
    fallback: SDPA takes that fallback silently for inputs such as a non-unit stride along the head
    dimension (CvT's and Twins-SVT's layout) or a 3-D mask against 4-D queries (Swin)."""
    model = build_model(name, 64, 1, 3, **SIZES[name]).eval()
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64))
    _assert_fused(name, sdpa_choices)


def test_state_dicts_unchanged_and_loadable() -> None:
    for name in list_models():
        for image_size in (64, 150):
            model = build_model(name, image_size, 1, 3)
            assert _fingerprint(model) == STATE_DICT_FINGERPRINTS[f"{name}@{image_size}"], (name, image_size)
    torch.manual_seed(0)
    src = build_model("Swin", 64, 1, 3).eval()
    dst = build_model("Swin", 64, 1, 3).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad(), attention("einsum"):
        ref = src(x)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), ref, atol=1e-5, rtol=1e-4)


def test_attention_switch() -> None:
    assert get_attention() == "sdpa"
    with attention("einsum"):
        assert get_attention() == "einsum"
    assert get_attention() == "sdpa"
    with pytest.raises(ValueError, match="'flash'.*valid: sdpa, einsum"):
        set_attention("flash")
    assert get_attention() == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FUSED))
def test_sdpa_matches_einsum_cuda(name: str, sdpa_choices: list[int]) -> None:
    """On CUDA the fused kernels run (memory-efficient in fp32; flash under bf16 autocast), LeViT's included:
    fp32 outputs agree with einsum (TF32 off), bf16 outputs within bf16 rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model(name, 64, 1, 3).cuda().eval()
    x = torch.rand(8, 1, 64, 64, device="cuda")
    with torch.no_grad():
        with attention("einsum"):
            ref = model(x)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    _assert_fused(name, sdpa_choices)
