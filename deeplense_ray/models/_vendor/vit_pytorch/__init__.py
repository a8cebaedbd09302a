"""The architectures used here from vit-pytorch 1.26.11 (https://github.com/lucidrains/vit-pytorch, MIT licence,
copyright (c) 2020 Phil Wang, see LICENSE in this directory).

Copied verbatim: cait, cct, cross_vit, crossformer, cvt, levit, pit, t2t, twins_svt, vit, vit_for_small_dataset;
the only change is t2t's ``from vit_pytorch.vit import Transformer``, made relative. They need only torch and
einops. The package itself is not a dependency: it declares torchvision (its ``__init__`` imports it through
``dino``), which pins its own torch and would pull a CUDA build onto a CPU machine, and none of these modules
uses it. To update: copy the same files from a newer release, re-apply the t2t import, run tests/test_models.py.
"""
