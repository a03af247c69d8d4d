"""``inference.keep_unchanged``: the source's own pixels wherever the edit left the image alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from mgie.config import ConfigError, load_config
from mgie.images import keep_unchanged, to_pil
from mgie.pipeline import MGIEPipeline

from .conftest import make_model, random_image

CELL, TOL = 4, 0.1


def _small(img: Image.Image, size) -> torch.Tensor:
    """(3, h, w) in [0, 1]."""
    return torch.from_numpy(
        np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255
    ).permute(2, 0, 1)


def _plain(small: torch.Tensor, size) -> Image.Image:
    """The decoded output resized to the source, as the pipeline does without keep_unchanged."""
    return to_pil(small[None])[0].resize(size, Image.Resampling.LANCZOS)


def _reference_cells(src: np.ndarray, out: np.ndarray, tol: float, cell: int, grow: int) -> np.ndarray:
    """Changed cells, recomputed with loops in float64: (rows, cols) bool."""
    rows, cols = src.shape[1] // cell, src.shape[2] // cell
    moved = np.zeros((rows, cols), bool)
    for r in range(rows):
        for c in range(cols):
            a = src[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].astype(np.float64).mean((1, 2))
            b = out[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].astype(np.float64).mean((1, 2))
            moved[r, c] = np.abs(a - b).max() > tol
    grown = np.zeros_like(moved)
    for r in range(rows):
        for c in range(cols):
            grown[r, c] = moved[max(0, r - grow) : r + grow + 1, max(0, c - grow) : c + grow + 1].any()
    return grown


def test_unchanged_cells_take_the_source_and_changed_ones_the_output():
    source = random_image(96, 64, seed=1)  # full resolution
    small_src = _small(source, (48, 32))  # (3, 32, 48): a 8 x 12 grid of 4 px cells
    small_out = small_src.clone()
    small_out[:, 8:16, 24:32] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a red patch: 2 x 2 cells
    small_out[:, 20:32, 0:12] += 0.03  # a faint shift, below the tolerance: not an edit
    plain_img = _plain(small_out.clamp(0, 1), source.size)
    result = np.asarray(keep_unchanged(source, plain_img, small_src, small_out, TOL, CELL), dtype=np.int16)
    plain = np.asarray(plain_img, dtype=np.int16)
    src = np.asarray(source, dtype=np.int16)
    cells = _reference_cells(small_src.numpy(), small_out.numpy(), TOL, CELL, grow=1)
    assert cells.sum() == 16  # the 2 x 2 patch grown by one cell: 4 x 4
    scale = 96 // 12  # full-resolution pixels per cell
    checked = {True: 0, False: 0}
    for y in range(64):
        for x in range(96):
            r, c = y // scale, x // scale
            around = cells[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2]
            if around.all() or not around.any():  # far from a border: no blending
                want = plain if around.all() else src
                assert np.array_equal(result[y, x], want[y, x]), (y, x)
                checked[bool(around.all())] += 1
    assert checked == {True: 4 * 64, False: 60 * 64}  # the 2 x 2 patch itself; the cells two away


def test_a_global_edit_gives_the_plain_output_and_no_edit_the_source():
    source = random_image(64, 64, seed=2)
    small_src = _small(source, (32, 32))
    darker = small_src * 0.5  # every cell moves
    plain = _plain(darker, source.size)
    assert keep_unchanged(source, plain, small_src, darker, TOL, CELL).tobytes() == plain.tobytes()
    faint = small_src + 0.01
    kept = keep_unchanged(source, _plain(faint, source.size), small_src, faint, TOL, CELL)
    assert kept.tobytes() == source.tobytes()


def test_size_must_be_a_multiple_of_the_cell():
    source = random_image(30, 30)
    with pytest.raises(ValueError, match="multiple of the cell"):
        keep_unchanged(source, source, _small(source, (30, 30)), _small(source, (30, 30)), TOL, 4)


def test_pipeline_keep_one_gives_the_source_back_and_zero_the_plain_output(tiny_cfg, tokenizer):
    pipe = MGIEPipeline(make_model(tiny_cfg, tokenizer, adapters=False))
    img = random_image(40, 24, seed=3)
    assert pipe.cfg.inference.keep_unchanged == 0  # the paper's behaviour unless asked
    plain = pipe([img], ["make it dark"], steps=2, progress=False).images[0]
    off = pipe([img], ["make it dark"], steps=2, progress=False, keep=0.0).images[0]
    kept = pipe([img], ["make it dark"], steps=2, progress=False, keep=1.0).images[0]
    assert plain.tobytes() == off.tobytes() != img.tobytes()
    assert kept.tobytes() == img.tobytes()  # no cell can move by more than 1


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_config_refuses_a_tolerance_outside_0_1(value):
    assert load_config(overrides=["inference.keep_unchanged=0.1"]).inference.keep_unchanged == 0.1
    with pytest.raises(ConfigError, match="keep_unchanged"):
        load_config(overrides=[f"inference.keep_unchanged={value}"])
