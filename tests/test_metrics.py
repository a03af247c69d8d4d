import math

import numpy as np
import pytest

from mgie.metrics import exact_match, l1, l2, psnr, ssim, token_f1


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct float64 loops over every 11 x 11 window (Wang et al. 2004, Gaussian sigma 1.5)."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[2]):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                p, q = a[i : i + 11, j : j + 11, ch], b[i : i + 11, j : j + 11, ch]
                mp, mq = (w * p).sum(), (w * q).sum()
                vp, vq = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2
                cov = (w * p * q).sum() - mp * mq
                vals.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.random((16, 18, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(ssim_reference(a, b), abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ssim(a[:8, :8], b[:8, :8])


def test_pixel_metrics():
    a = np.zeros((4, 4, 3))
    b = np.full((4, 4, 3), 0.1)
    assert l1(a, b) == pytest.approx(0.1) and l2(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(20.0) and math.isinf(psnr(a, a))


def test_text_metrics():
    assert exact_match("Change the colour, of the red square.", "change the colour of the red square")
    assert not exact_match("change the red square", "change the blue square")
    assert token_f1("remove the red square", "remove the red square") == 1.0
    assert token_f1("remove the red square", "remove the blue circle") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0 and token_f1("", "") == 1.0


def test_feature_scores_with_user_supplied_weights(tmp_path):
    """CLIP-I and DINO load from a folder (tiny random models here) and are cosines x 100."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    from mgie.metrics import clip_scores, dino_score

    from .conftest import random_image

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(vision_config=small, text_config=dict(hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2), projection_dim=16)).save_pretrained(tmp_path / "clip")  # fmt: skip
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    ViTModel(ViTConfig(**small), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    a, b = [random_image(40, 40, seed=1)], [random_image(40, 40, seed=2)]
    assert clip_scores(str(tmp_path / "clip"), a, a, None)["clip_i"] == pytest.approx(100, abs=1e-3)
    assert dino_score(str(tmp_path / "dino"), a, a) == pytest.approx(100, abs=1e-3)
    assert -100 <= clip_scores(str(tmp_path / "clip"), a, b, None)["clip_i"] < 100
    assert -100 <= dino_score(str(tmp_path / "dino"), a, b) < 100
