"""Evaluation metrics: the paper's pixel metrics, feature similarities, text scores, and the
exact edit-success check of the shapes world.

Pixel metrics follow the MagicBrush evaluation conventions (images in [0, 1], the output resized
to the ground truth's size): L1, L2 (MSE), PSNR (dB), SSIM (Gaussian 11 x 11, sigma 1.5, Wang et
al. 2004; reported in [0, 1]). CLIP-I, CLIP-T and DINO need weights a user supplies
(``from_pretrained(path)``), LPIPS (AlexNet, v0.1) a folder with its two weight files
(:func:`load_lpips`); without them they are reported as unavailable, never invented.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


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


def _edit_arrays(source: Image.Image, target: Image.Image, output: Image.Image, changed_tol: float):
    """(s, t, o, R, keep): the three images as (H, W, 3) arrays at the source's size, the pixels the
    ground truth changes (max channel change > ``changed_tol``) and those farther than 2 px from R."""
    s, t = as_array(source), as_array(target, source.size)
    o = as_array(output, source.size)
    region = np.abs(t - s).max(-1) > changed_tol  # (H, W)
    return s, t, o, region, ~_dilate(region, 2)


# The names of the checks of :func:`edit_checks`, in the order they are reported.
CHECKS = ("kept", "no_stray", "reach", "near", "closer")


def edit_checks(
    source: Image.Image,
    target: Image.Image,
    output: Image.Image,
    changed_tol: float = 0.1,
    reach: float = 0.65,
    max_err: float = 0.08,
    closer: float = 0.8,
    keep_tol: float = 0.04,
    stray: float = 0.02,
) -> dict[str, bool]:
    """Each check of :func:`edit_success` on its own: name (see ``CHECKS``) -> passed.

    Region R = pixels the ground truth changes (max channel change > ``changed_tol``); K = the
    pixels farther than 2 px from R. ``kept``: mean |out - src| on K <= ``keep_tol``;
    ``no_stray``: at most ``stray`` of K's pixels change by more than 0.2; ``reach``: inside R the
    output covers at least ``reach`` of the way (mean |out - tgt| <= (1 - reach) mean |src - tgt|);
    ``near``: mean |out - tgt| on R <= ``max_err`` (which tells the world's colours apart);
    ``closer``: at least a fraction ``closer`` of R's pixels are nearer the target than the source.
    A check over an empty set passes.
    """
    s, t, o, region, keep = _edit_arrays(source, target, output, changed_tol)
    out = dict.fromkeys(CHECKS, True)
    if keep.any():
        moved = np.abs(o - s)[keep]  # (|K|, 3)
        out["kept"] = bool(moved.mean() <= keep_tol)
        out["no_stray"] = bool((moved.max(-1) > 0.2).mean() <= stray)
    if region.any():
        need = np.abs(s - t)[region].mean()
        err = np.abs(o - t)[region].mean()
        nearer = np.abs(o - t).sum(-1)[region] < np.abs(o - s).sum(-1)[region]  # (|R|,)
        out["reach"] = bool(err <= (1 - reach) * need)
        out["near"] = bool(err <= max_err)
        out["closer"] = bool(nearer.mean() >= closer)
    return out


def edit_success(source: Image.Image, target: Image.Image, output: Image.Image, **tols: float) -> bool:
    """Whether ``output`` performs the edit from ``source`` to the exact ground truth ``target``.

    Inside the region R the ground truth changes, the output must cover most of the way to the
    target, land near it and be nearer the target than the source at most pixels; outside R
    dilated by 2 px, nothing may change. Every one of :func:`edit_checks` (tolerances ``tols``
    as there) must pass.
    """
    return all(edit_checks(source, target, output, **tols).values())


def edit_anatomy(
    source: Image.Image, target: Image.Image, output: Image.Image, changed_tol: float = 0.1
) -> dict[str, float]:
    """Why an edit fails: where the output changed and whether it changed the right way.

    On the region R of :func:`edit_success`, with ``need`` = mean |src - tgt| there:
    ``moved`` = mean |out - src| / need (how much the output changed R at all: 0 untouched, about 1
    for a change of the right size, right or wrong), ``reach`` = 1 - mean |out - tgt| / need (how far
    it got towards the target: 1 exact, 0 no closer than the source, negative farther away);
    ``spill`` = mean |out - src| outside R dilated by 2 px (changes where the edit asks none; NaN
    when R covers the image). A wrong colour in the right place reads moved ~1, reach ~0, spill ~0;
    the right edit of the wrong object reads moved ~0 and a large spill. NaN fields are undefined.
    """
    s, t, o, region, keep = _edit_arrays(source, target, output, changed_tol)
    nan = float("nan")
    need = float(np.abs(s - t)[region].mean()) if region.any() else 0.0
    return {
        "moved": float(np.abs(o - s)[region].mean()) / need if need else nan,
        "reach": 1.0 - float(np.abs(o - t)[region].mean()) / need if need else nan,
        "spill": float(np.abs(o - s)[keep].mean()) if keep.any() else nan,
    }


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


# ----------------------------------------------------------------------------- LPIPS

LPIPS_TAPS = (1, 4, 7, 9, 11)  # the ReLUs ending the slices features[0:2], [2:5], [5:8], [8:10], [10:12]
LPIPS_CHANNELS = (64, 192, 384, 256, 256)


class _Lin(nn.Module):
    """An LPIPS head ``lin<k>``: dropout (inactive in eval) and a 1 x 1 convolution to one channel."""

    def __init__(self, chn: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel weighted distance map, one channel."""
        return self.model(x)  # (N, C, H, W) -> (N, 1, H, W)


class LPIPS(nn.Module):
    """LPIPS v0.1 on AlexNet (Zhang et al. 2018; the ``lpips`` package's ``net='alex'``).

    Parameter names are those of the two weight files, so the key mapping is the identity:
    torchvision's AlexNet ``features.{0,3,6,8,10}.{weight,bias}`` (its ``classifier.*`` dropped)
    and lpips' ``lin{0..4}.model.1.weight``. Inputs are RGB in [-1, 1]; the output is one distance
    per pair (lower is more alike).
    """

    def __init__(self):
        super().__init__()
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift[None, :, None, None], persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("scale", scale[None, :, None, None], persistent=False)
        self.features = nn.Sequential(  # torchvision's alexnet().features
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.lins = [f"lin{k}" for k in range(len(LPIPS_CHANNELS))]
        for name, chn in zip(self.lins, LPIPS_CHANNELS):
            self.add_module(name, _Lin(chn))
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at the five taps, each unit-normalised over channels."""
        if min(x.shape[-2:]) < 31:
            raise ValueError("LPIPS needs images of at least 31 x 31 px")
        x = (x - self.shift) / self.scale  # (N, 3, H, W)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # (N, C_k, H_k, W_k)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances of the pairs ``x[i], y[i]``: (N, 3, H, W) twice -> (N,)."""
        d = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for name, a, b in zip(self.lins, self.taps(x), self.taps(y)):
            d = d + getattr(self, name)((a - b) ** 2).mean((1, 2, 3))  # (N,)
        return d


def _state_dicts(folder: Path) -> dict[str, tuple[Path, dict]]:
    """The folder's ``.pth`` files by kind, "alexnet" or "lin", told apart by their keys."""
    found: dict[str, tuple[Path, dict]] = {}
    for f in sorted(folder.glob("*.pth")):
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)  # tensors only, no arbitrary pickles
        except Exception as e:  # any failure means a bad file
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot load {f} as a plain state dict: {why}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{f} is not a state dict of tensors")
        if any(k.startswith("features.") for k in sd):
            kind = "alexnet"
        elif any(k.startswith("lin") for k in sd):
            kind = "lin"
        else:
            raise ValueError(f"{f} holds neither AlexNet features.* nor LPIPS lin*.model.1.weight keys")
        if kind in found:
            raise ValueError(f"two {kind} weight files in {folder}: {found[kind][0].name}, {f.name}")
        found[kind] = (f, sd)
    return found


def _mismatches(f: Path, state: dict, want: dict[str, torch.Size]) -> list[str]:
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k} {tuple(state[k].shape)} (want {tuple(want[k])})"
              for k in sorted(set(state) & set(want)) if state[k].shape != want[k]]  # fmt: skip
    parts = [(missing, "missing"), (unexpected, "unexpected"), (shapes, "wrong shape")]
    return [f"{f.name}: {what} {', '.join(keys)}" for keys, what in parts if keys]


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS from a folder holding torchvision's ``alexnet-owt-7be5be79.pth`` and lpips'
    ``weights/v0.1/alex.pth`` (any file names), loaded with ``weights_only=True`` and strictly."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"LPIPS weights folder not found: {folder}")
    found = _state_dicts(folder)
    need = {
        "alexnet": "torchvision AlexNet weights (features.*)",
        "lin": "LPIPS v0.1 alex.pth (lin*.model.1.weight)",
    }
    absent = [need[k] for k in need if k not in found]
    if absent:
        raise ValueError(f"no {' or '.join(absent)} among the .pth files in {folder}")
    model = LPIPS()
    want = {k: v.shape for k, v in model.state_dict().items()}
    (fa, alex), (fl, lin) = found["alexnet"], found["lin"]
    alex = {k: v for k, v in alex.items() if not k.startswith("classifier.")}  # the classifier is unused
    errors = _mismatches(fa, alex, {k: s for k, s in want.items() if k.startswith("features.")})
    errors += _mismatches(fl, lin, {k: s for k, s in want.items() if not k.startswith("features.")})
    if errors:
        raise ValueError("LPIPS weights do not match: " + "; ".join(errors))
    model.load_state_dict({**alex, **lin}, strict=True)
    return model


@torch.no_grad()
def lpips_score(path: str | Path, outputs: list[Image.Image], targets: list[Image.Image]) -> float:
    """LPIPS (AlexNet, v0.1; raw distance, lower is better): mean over (output, target) pairs, the
    output resized (bicubic) to its target."""
    model = load_lpips(path)

    def tensor(img, size=None):
        return torch.from_numpy(as_array(img, size) * 2 - 1).permute(2, 0, 1)[None].float()  # (1, 3, H, W)

    return float(torch.cat([model(tensor(o, t.size), tensor(t)) for o, t in zip(outputs, targets)]).mean())
