"""The architectures used here from vit-pytorch 1.26.11 (https://github.com/lucidrains/vit-pytorch, MIT licence,
copyright (c) 2020 Phil Wang, see LICENSE in this directory).

Copied: cait, cct, cross_vit, crossformer, cvt, levit, pit, t2t, twins_svt, vit, vit_for_small_dataset. They
need only torch and einops. Changes, each marked ``deeplense-ray`` in the code:

- t2t: ``from vit_pytorch.vit import Transformer`` made relative.
- Fused attention. Each attention ``forward`` imports ``fused_attention, sdpa`` from
  ``deeplense_ray.models.attention`` and, when fused attention is on (the default), computes the
  attention output with one ``sdpa(...)`` call (``torch.nn.functional.scaled_dot_product_attention``).
  The original lines follow unchanged under ``else:`` (the ``"einsum"`` choice). Dropout on the attention
  weights becomes ``dropout_p = <the layer's Dropout>.p if self.training else 0.``. Per file:
  vit (also used by t2t), pit, cross_vit and cvt: ``scale = self.scale``. cct and crossformer scale q
  before (unchanged), so ``scale = 1.``. crossformer's dynamic position bias [n, n] is the additive
  ``attn_mask``. Its ``sim = einsum(...)`` line moves below the bias computation, into the ``else:``
  branch. levit's positional bias goes in as ``attn_mask = self.apply_pos_bias(0.)``, i.e. ``bias /
  scale``, as the original adds it. vit_for_small_dataset (LSA): the learned temperature is folded into
  q (``q * self.temperature.exp()``, ``scale = 1.``). The masked diagonal becomes a boolean
  ``attn_mask`` (True = attend), which gives exactly 0 weight, as the original's ``-finfo.max`` fill
  does. twins_svt: both LocalAttention (no attention dropout) and GlobalAttention. cvt and twins_svt
  lay q, k, v out as [batch * heads, n, d]; ``sdpa`` adds a unit head axis for the 4-D fused kernels.
- cait keeps its einsum attention. Talking heads mix the heads once before the softmax (W1) and once after
  it (W2): ``out_g = sum_h W2[h, g] softmax(sum_h' W1[h', g] q_h' k_h'^T * scale) v_g``. The pre-softmax
  mix is exact in SDPA with a wider head (q'_g = [W1[h', g] q_h'] over h', k' = [k_h'], head dim
  heads * dim_head). The post-softmax mix needs every (h, g) pair of weights and values. SDPA can only
  give that as heads x heads products (values [v_g] over g, head dim heads * dim_head again). That
  costs heads times (8x by default, 12x at the comparable size) the matrix products that einsum does
  on the materialised attention matrix. No fused kernel wins that trade, so the original code stays.
- The parameters and buffers are unchanged: checkpoints written before these changes load
  (tests/test_attention_sdpa.py checks the state_dict keys and shapes, and that both paths give the same
  outputs and gradients).

The package itself is not a dependency: it declares torchvision (its ``__init__`` imports it via ``dino``),
which pins its own torch and would pull a CUDA build onto a CPU machine, and none of these modules uses it.
To update: copy the same files from a newer release, re-apply the changes above, run tests/test_models.py and
tests/test_attention_sdpa.py.
"""
