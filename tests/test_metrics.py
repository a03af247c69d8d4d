import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgie.metrics import LPIPS, exact_match, l1, l2, load_lpips, lpips_score, psnr, ssim, token_f1

from .conftest import random_image


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


# ----------------------------------------------------------------------------- LPIPS

ALEX = {
    0: (64, 3, 11, 11),
    3: (192, 64, 5, 5),
    6: (384, 192, 3, 3),
    8: (256, 384, 3, 3),
    10: (256, 256, 3, 3),
}


def write_lpips_weights(folder, seed: int = 0):
    """Random weights under the real files' key names and shapes (torchvision's AlexNet, with a few
    classifier keys, and lpips' v0.1 alex.pth), saved under arbitrary file names."""
    g = torch.Generator().manual_seed(seed)
    alex = {}
    for i, shape in ALEX.items():
        alex[f"features.{i}.weight"] = torch.randn(shape, generator=g) * (2 / math.prod(shape[1:])) ** 0.5
        alex[f"features.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.05
    alex |= {"classifier.1.weight": torch.randn(4, 8), "classifier.1.bias": torch.randn(4),
             "classifier.6.weight": torch.randn(2, 4)}  # fmt: skip
    lin = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for k, c in enumerate((64, 192, 384, 256, 256))
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(alex, folder / "backbone.pth")
    torch.save(lin, folder / "heads.pth")
    return alex, lin


def lpips_reference(alex: dict, lin: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 alex written out with functional ops in float64: (N, 3, H, W) in [-1, 1] twice -> (N,)."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def conv(z, i, **kw):
        return F.relu(
            F.conv2d(z, alex[f"features.{i}.weight"].double(), alex[f"features.{i}.bias"].double(), **kw)
        )

    def taps(z):
        f1 = conv((z - shift) / scale, 0, stride=4, padding=2)
        f2 = conv(F.max_pool2d(f1, 3, 2), 3, padding=2)
        f3 = conv(F.max_pool2d(f2, 3, 2), 6, padding=1)
        f4 = conv(f3, 8, padding=1)
        f5 = conv(f4, 10, padding=1)
        return [f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (f1, f2, f3, f4, f5)]

    total = torch.zeros(len(x), dtype=torch.float64)
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        total += ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"].double()).sum(1).mean((1, 2))
    return total


def _pm1(img: Image.Image) -> torch.Tensor:
    """PIL image -> float64 (1, 3, H, W) in [-1, 1], as lpips.im2tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.float64) / 127.5 - 1).permute(2, 0, 1)[None]


def test_lpips_loads_real_key_names_and_matches_direct_computation(tmp_path):
    alex, lin = write_lpips_weights(tmp_path / "w")
    model = load_lpips(tmp_path / "w")
    assert isinstance(model, LPIPS) and not model.training
    assert torch.equal(model.features[10].weight, alex["features.10.weight"])
    assert torch.equal(model.lin4.model[1].weight, lin["lin4.model.1.weight"])
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(2, 3, 48, 56, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    want = lpips_reference(alex, lin, x, y)
    assert (want > 0).all()
    torch.testing.assert_close(model.double()(x, y), want, rtol=1e-6, atol=0)
    # lpips_score: PIL images, float32, the output resized (bicubic) to its target
    out, tgt = random_image(40, 36, seed=3), random_image(48, 44, seed=4)
    ref = lpips_reference(alex, lin, _pm1(out.resize(tgt.size, Image.Resampling.BICUBIC)), _pm1(tgt))
    assert lpips_score(tmp_path / "w", [out], [tgt]) == pytest.approx(float(ref), rel=1e-4)


def test_lpips_is_zero_on_itself_and_symmetric(tmp_path):
    write_lpips_weights(tmp_path / "w")
    a, b = random_image(48, 48, seed=5), random_image(48, 48, seed=6)
    assert lpips_score(str(tmp_path / "w"), [a], [a]) == 0.0
    ab, ba = lpips_score(tmp_path / "w", [a], [b]), lpips_score(tmp_path / "w", [b], [a])
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-6)
    assert lpips_score(tmp_path / "w", [a, a], [b, a]) == pytest.approx(ab / 2, rel=1e-6)
    with pytest.raises(ValueError, match="at least 31 x 31"):
        lpips_score(tmp_path / "w", [a.resize((24, 24))], [a.resize((24, 24))])


def test_lpips_rejects_bad_weight_folders(tmp_path):
    with pytest.raises(ValueError, match="LPIPS weights folder not found"):
        load_lpips(tmp_path / "none")
    alex, lin = write_lpips_weights(tmp_path / "w")
    (tmp_path / "w" / "heads.pth").unlink()
    with pytest.raises(ValueError, match=r"no LPIPS v0\.1 alex\.pth \(lin\*\.model\.1\.weight\)"):
        load_lpips(tmp_path / "w")
    torch.save({**lin, "lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "w" / "heads.pth")
    with pytest.raises(
        ValueError,
        match=r"heads\.pth: wrong shape lin0\.model\.1\.weight \(1, 3, 1, 1\) \(want \(1, 64, 1, 1\)\)",
    ):
        load_lpips(tmp_path / "w")
    torch.save(lin, tmp_path / "w" / "heads.pth")
    bad = {k: v for k, v in alex.items() if k != "features.0.bias"} | {"features.1.weight": torch.zeros(1)}
    torch.save(bad, tmp_path / "w" / "backbone.pth")
    with pytest.raises(
        ValueError, match="backbone.pth: missing features.0.bias; backbone.pth: unexpected features.1.weight"
    ):
        load_lpips(tmp_path / "w")
    torch.save({"features.0.weight": Path("not a tensor")}, tmp_path / "w" / "backbone.pth")
    with pytest.raises(ValueError, match="cannot load .*backbone.pth as a plain state dict"):
        load_lpips(tmp_path / "w")  # weights_only=True refuses arbitrary pickles
