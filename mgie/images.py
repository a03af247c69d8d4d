"""Reading, normalising and resizing user images, and tensor conversions.

Any PIL mode is accepted (RGBA/LA/P composited on white with the alpha kept aside, L, CMYK,
16-bit and float greyscale rescaled), EXIF orientation is applied, and absurd sizes are refused
before decoding. Errors are :class:`ImageError` with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # refuse anything larger (a decompression bomb or a mistake)
MIN_SIDE = 8


class ImageError(ValueError):
    """An input image cannot be used."""


@dataclass
class LoadedImage:
    """An RGB image ready for the model, plus what is needed to give the output back its form."""

    rgb: Image.Image
    alpha: Image.Image | None  # original alpha channel, re-attached to PNG/WebP outputs


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit 'L' by the range its mode implies."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 65535.0
    elif img.mode == "F":
        hi = float(arr.max(initial=0))
        arr = arr.astype(np.float64) / (hi if hi > 1.0 else 1.0)
    else:
        arr = arr.astype(np.float64) / 255.0
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="L")


def normalize_image(img: Image.Image) -> LoadedImage:
    """Apply EXIF orientation and bring any mode to RGB (alpha composited on white, kept aside)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    alpha = None
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return LoadedImage(rgb=img.convert("RGB"), alpha=alpha)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Open, verify and normalise an image file; ``ImageError`` on anything unusable."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} = {w * h} pixels (limit {max_pixels})")
            if min(w, h) < MIN_SIDE:
                raise ImageError(f"image too small: {w}x{h} (each side must be >= {MIN_SIDE} px)")
            img.load()
            return normalize_image(img)
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (or an unsupported format): {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"cannot read image {path}: {e}") from None


def fit_size(width: int, height: int, max_side: int, multiple: int = 8) -> tuple[int, int]:
    """Size with the same aspect ratio, longer side <= ``max_side``, both sides multiples of ``multiple``."""
    scale = min(1.0, max_side / max(width, height))
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return min(w, max_side // multiple * multiple), min(h, max_side // multiple * multiple)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float32 in [-1, 1] (diffusers' convention)."""
    arr = np.stack([np.array(im).astype(np.float32) / 255.0 for im in images])  # (B, H, W, 3)
    return 2.0 * torch.from_numpy(arr).permute(0, 3, 1, 2) - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB PIL images (rounded as diffusers does)."""
    arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def keep_unchanged(
    source: Image.Image,
    output: Image.Image,
    small_source: torch.Tensor,
    small_output: torch.Tensor,
    tol: float,
    cell: int,
    grow: int = 1,
) -> Image.Image:
    """``output`` (at the source's size) with the source's own pixels where the edit left it alone.

    ``small_source`` and ``small_output`` (3, h, w) in [0, 1] are the source and the decoded output
    at the diffusion size. A cell of ``cell`` x ``cell`` px (one latent cell) counts as changed when
    its mean colour moved by more than ``tol`` in any channel; cells within ``grow`` cells of a
    changed one count as changed too. Changed cells take ``output``, the others the
    full-resolution source; the mask is upsampled bilinearly, so the two blend over one cell at the
    border. Everything changed (a global edit) gives ``output`` itself.
    """
    h, w = small_source.shape[-2:]
    if h % cell or w % cell:
        raise ValueError(f"diffusion size {w}x{h} is not a multiple of the cell {cell}")
    moved = F.avg_pool2d(small_output[None].float(), cell) - F.avg_pool2d(small_source[None].float(), cell)
    changed = (moved.abs().amax(1, keepdim=True) > tol).float()  # (1, 1, h / cell, w / cell)
    changed = F.max_pool2d(changed, 2 * grow + 1, stride=1, padding=grow) if grow else changed
    if bool(changed.all()):
        return output
    mask = F.interpolate(changed, size=(source.height, source.width), mode="bilinear")[0, 0]  # (H, W)
    mask = mask.cpu().numpy()[..., None]  # (H, W, 1) in [0, 1]
    src = np.asarray(source.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    mixed = mask * np.asarray(output, dtype=np.float32) + (1.0 - mask) * src
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8))
