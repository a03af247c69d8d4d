"""Evaluation metrics: the paper's pixel metrics, feature similarities, text scores, and the
exact edit-success check of the shapes world.

Pixel metrics follow the MagicBrush evaluation conventions (images in [0, 1], the output resized
to the ground truth's size): L1, L2 (MSE), PSNR (dB), SSIM (Gaussian 11 x 11, sigma 1.5, Wang et
al. 2004; reported in [0, 1]). CLIP-I, CLIP-T and DINO need weights a user supplies
(``from_pretrained(path)``); without them they are reported as unavailable, never invented.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def as_array(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB image -> float64 (H, W, 3) in [0, 1], resized (bicubic) to ``size`` if given."""
    img = img.convert("RGB")
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


def l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference."""
    return float(np.abs(a - b).mean())


def l2(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference."""
    return float(((a - b) ** 2).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for data range 1 (inf for identical images)."""
    mse = l2(a, b)
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over channels and valid (unpadded) windows, data range 1, float64."""
    k1, k2 = 0.01, 0.03
    c1, c2 = k1**2, k2**2
    x = torch.from_numpy(a).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    y = torch.from_numpy(b).permute(2, 0, 1)[:, None]
    w = _gaussian(size, sigma)[None, None]  # (1, 1, s, s)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size} x {size} px")
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def pixel_metrics(output: Image.Image, target: Image.Image) -> dict[str, float]:
    """L1, L2, PSNR and SSIM of ``output`` against ``target`` (output resized to the target)."""
    t = as_array(target)
    o = as_array(output, target.size)
    return {"l1": l1(o, t), "l2": l2(o, t), "psnr": psnr(o, t), "ssim": ssim(o, t)}


# ----------------------------------------------------------------------------- text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def exact_match(pred: str, truth: str) -> bool:
    """Equal after lower-casing and dropping punctuation and extra spaces."""
    return _words(pred) == _words(truth)


def token_f1(pred: str, truth: str) -> float:
    """Bag-of-words F1 (SQuAD style) between two texts."""
    p, t = _words(pred), _words(truth)
    common = sum((Counter(p) & Counter(t)).values())
    if not p or not t or common == 0:
        return float(not p and not t)
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- shapes world


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0


def edit_success(
    source: Image.Image,
    target: Image.Image,
    output: Image.Image,
    changed_tol: float = 0.1,
    reach: float = 0.65,
    max_err: float = 0.08,
    closer: float = 0.8,
    keep_tol: float = 0.04,
    stray: float = 0.02,
) -> bool:
    """Whether ``output`` performs the edit from ``source`` to the exact ground truth ``target``.

    Region R = pixels the ground truth changes (max channel change > ``changed_tol``).
    Inside R the output must cover at least ``reach`` of the way (mean |out - tgt| <=
    (1 - reach) mean |src - tgt|), land near the target (mean |out - tgt| <= ``max_err``, which
    tells the world's colours apart), and be closer to the target than to the source at a
    fraction ``closer`` of R's pixels. Outside R dilated by 2 px, nothing may change: mean |out - src| <=
    ``keep_tol`` and at most ``stray`` of those pixels change by more than 0.2.
    """
    s, t = as_array(source), as_array(target, source.size)
    o = as_array(output, source.size)
    region = np.abs(t - s).max(-1) > changed_tol  # (H, W)
    keep = ~_dilate(region, 2)
    if keep.any():
        moved = np.abs(o - s)[keep]
        if moved.mean() > keep_tol or (moved.max(-1) > 0.2).mean() > stray:
            return False
    if not region.any():
        return True
    need = np.abs(s - t)[region].mean()
    err = np.abs(o - t)[region]
    nearer = np.abs(o - t).sum(-1)[region] < np.abs(o - s).sum(-1)[region]
    return bool(err.mean() <= min((1 - reach) * need, max_err) and nearer.mean() >= closer)


# ----------------------------------------------------------------------------- learned features


@torch.no_grad()
def clip_scores(
    path: str, outputs: list[Image.Image], targets: list[Image.Image], captions: list[str] | None
):
    """CLIP-I (cosine of image embeddings, x100) and, with captions, CLIP-T (output vs caption, x100)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model, proc = CLIPModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)

    def emb(imgs):
        out = model.get_image_features(**proc(images=imgs, return_tensors="pt"))
        return F.normalize(
            getattr(out, "pooler_output", out), dim=-1
        )  # transformers 5 returns an output object

    eo, et = emb(outputs), emb(targets)
    out = {"clip_i": float((eo * et).sum(-1).mean() * 100)}
    if captions:
        text = AutoTokenizer.from_pretrained(path)(
            captions, return_tensors="pt", padding=True, truncation=True
        )
        feats = model.get_text_features(**text)
        ec = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
        out["clip_t"] = float((eo * ec).sum(-1).mean() * 100)
    return out


@torch.no_grad()
def dino_score(path: str, outputs: list[Image.Image], targets: list[Image.Image]) -> float:
    """DINO: cosine of ViT CLS features (x100), output vs target."""
    from transformers import AutoImageProcessor, AutoModel

    model, proc = AutoModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)

    def cls(imgs):
        return F.normalize(model(**proc(images=imgs, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)

    return float((cls(outputs) * cls(targets)).sum(-1).mean() * 100)
