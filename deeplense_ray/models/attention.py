"""How every attention layer of the model zoo computes softmax(q k^T * scale + bias) v.

``"sdpa"`` (the default): :func:`torch.nn.functional.scaled_dot_product_attention`, which picks a fused
kernel (flash or memory-efficient on CUDA) and never materialises the attention matrix when it can avoid it.
``"einsum"``: the explicit matrix products and softmax of the original vit-pytorch code, kept for the
equivalence tests and for before/after benchmarks (``benchmarks/train_throughput.py --attention``).

Both give the same outputs within float rounding in eval mode and use the same parameters. In training mode
attention dropout draws different random numbers in the two (SDPA drops inside the kernel). CaiT's
talking-heads attention stays on einsum in both modes (see the vendored package's docstring).

The choice is process-wide: :func:`set_attention` or the :func:`attention` context manager, read by each
layer's ``forward`` through :func:`fused_attention` (torch.compile guards on it and recompiles on a change).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("sdpa", "einsum")

_impl = "sdpa"


def set_attention(impl: str) -> str:
    """Select ``"sdpa"`` or ``"einsum"`` for every attention layer; returns the previous choice."""
    global _impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is unknown; valid: {', '.join(IMPLEMENTATIONS)}")
    previous, _impl = _impl, impl
    return previous


def get_attention() -> str:
    """The current choice, ``"sdpa"`` or ``"einsum"``."""
    return _impl


@contextmanager
def attention(impl: str) -> Iterator[None]:
    """Use ``impl`` (``"sdpa"`` or ``"einsum"``) inside the block, restore the previous choice after it."""
    previous = set_attention(impl)
    try:
        yield
    finally:
        set_attention(previous)


def fused_attention() -> bool:
    """True when attention layers should call :func:`sdpa` (the default)."""
    return _impl == "sdpa"


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + attn_mask) v`` with dropout ``dropout_p`` on the weights, through
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    q [..., n_q, d], k [..., n_k, d], v [..., n_k, d_v]. A 3-D input ([batch * heads, n, d], as CvT and
    Twins-SVT lay it out) gets a unit head axis for the call, because the fused CUDA kernels take 4-D inputs
    only. ``attn_mask``: boolean (True = attend) or an additive float bias broadcastable to
    [..., n_q, n_k]; a float bias is cast to q's dtype (SDPA requires it under autocast).
    """
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    # the fused kernels need unit stride along the head dimension; a layout such as CvT's
    # 'b (h d) x y -> (b h) (x y) d' has stride x*y there and would silently take the unfused math path
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if attn_mask is not None:
        # the fused kernels take a 2-D or a full-rank mask with unit stride along the keys
        if 2 < attn_mask.ndim < q.ndim:
            attn_mask = attn_mask.reshape((1,) * (q.ndim - attn_mask.ndim) + attn_mask.shape)
        if attn_mask.stride(-1) != 1:
            attn_mask = attn_mask.contiguous()
    if q.ndim == 3:
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask[:, None]
        out = F.scaled_dot_product_attention(
            q[:, None], k[:, None], v[:, None], attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
        )
        return out[:, 0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
