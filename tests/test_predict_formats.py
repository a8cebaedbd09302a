"""predict's FITS variants: a gzipped FITS file and a multi-HDU FITS file (the first HDU holding an image)
give the probabilities of the same image as .npy; an existing output is refused without ``overwrite``. A
real checkpoint of a small untrained network, real files read by astropy."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.io import fits

from deeplense_ray.infer.predict import run_prediction
from deeplense_ray.train.checkpoint import save_checkpoint
from deeplense_ray.train.modules import build_classifier
from tests.test_predict import ARCH, PROBS

SIZE = int(ARCH["image_shape"][-1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_classifier(ARCH)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(
        tmp_path_factory.mktemp("formats") / "checkpoint_000000", model=model, optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0), scaler=None, epoch=1,
        config={**ARCH, "seed": 0}, metrics={}, history=[],
    )  # fmt: skip


def _predict(ckpt, source, out, **kw) -> pd.DataFrame:
    run_prediction(str(ckpt), source, out, progress=False, log_mlflow=False, **kw)
    return pd.read_csv(out)


def test_gzipped_and_multi_hdu_fits_give_the_npy_probabilities(ckpt, tmp_path):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, SIZE, SIZE)).astype(np.float32)
    for i, image in enumerate(images):
        np.save(tmp_path / f"img{i}.npy", image)
    reference = _predict(ckpt, tmp_path / "img0.npy", tmp_path / "ref.csv")[PROBS].to_numpy()
    other = _predict(ckpt, tmp_path / "img1.npy", tmp_path / "other.csv")[PROBS].to_numpy()
    assert not np.allclose(reference, other, atol=1e-4)  # the two images are told apart

    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(images[0].astype(np.float64)).writeto(plain)
    (tmp_path / "gz.fits.gz").write_bytes(gzip.compress(plain.read_bytes()))
    # an empty primary HDU, then the image, then another image that must not be read
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(images[0]), fits.ImageHDU(images[1])]).writeto(
        tmp_path / "multi.fits"
    )
    for name in ("gz.fits.gz", "multi.fits"):
        table = _predict(ckpt, tmp_path / name, tmp_path / f"{name}.csv")
        assert len(table) == 1, name
        np.testing.assert_allclose(table[PROBS].to_numpy(), reference, atol=1e-6, err_msg=name)


def test_an_existing_output_is_refused_without_overwrite(ckpt, tmp_path):
    np.save(tmp_path / "img.npy", np.ones((SIZE, SIZE), dtype=np.float32))
    out = tmp_path / "p.csv"
    out.write_text("keep me\n")
    with pytest.raises(ValueError, match=f"{out} exists; pass --overwrite"):
        run_prediction(str(ckpt), tmp_path / "img.npy", out, progress=False, log_mlflow=False)
    assert out.read_text() == "keep me\n"
    assert len(_predict(ckpt, tmp_path / "img.npy", out, overwrite=True)) == 1
