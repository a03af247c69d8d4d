"""Shared, seeded tiny components. No network, no downloaded weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mgie.model import MGIEModel
from mgie.presets import tiny
from mgie.tokens import build_example, build_tiny_tokenizer, pad_sequences

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(*parts: str) -> Path:
    """A file in ../shared/fixtures, or skip the test with the reason when that folder is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture {path} is not available")
    return path


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny()


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    return build_tiny_tokenizer(tiny_cfg.model.mllm.text.vocab_size, tiny_cfg.model.mllm.num_img_tokens)


def make_model(cfg, tokenizer, seed: int = 0, adapters: bool = True) -> MGIEModel:
    """A tiny MGIE with seeded random weights."""
    torch.manual_seed(seed)
    return MGIEModel.from_config(cfg, tokenizer, adapters=adapters)


@pytest.fixture
def model(tiny_cfg, tokenizer):
    return make_model(tiny_cfg, tokenizer)


def make_batch(model: MGIEModel, n: int = 2, size: int = 32, seed: int = 0) -> dict:
    """A seeded training batch: random images, two different instruction/expressive pairs."""
    g = torch.Generator().manual_seed(seed)
    pairs = [
        ("make it look like night", "the sky turns dark with stars"),
        ("remove the red square", "the red square is gone"),
        ("make the sky blue", "a blue sky above the houses"),
    ]
    m = model.cfg.model.mllm
    patches = (m.vision.image_size // m.vision.patch_size) ** 2
    seqs, labels = zip(*[build_example(model.tokenizer, model.ids, *pairs[i % 3], patches) for i in range(n)])
    input_ids, mask = pad_sequences(list(seqs), model.ids.pad, side="right")
    lab, _ = pad_sequences(list(labels), -100, side="right")
    return dict(
        input_ids=input_ids,
        attention_mask=mask,
        labels=lab,
        pixel_values=torch.randn(n, 3, m.vision.image_size, m.vision.image_size, generator=g),
        source=torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        target=torch.rand(n, 3, size, size, generator=g) * 2 - 1,
    )


def random_image(w: int = 40, h: int = 24, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)
