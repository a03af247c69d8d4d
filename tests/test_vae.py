"""train/vae.py: the from-scratch VAE and its decoder-only fine-tuning."""

import pytest
import torch
from diffusers import AutoencoderKL

from mgie.data import shapes
from train.vae import main

TINY = [
    "model.diffusion.vae.block_out_channels=[8, 8]",
    "model.diffusion.vae.norm_num_groups=4",
    "model.diffusion.vae.latent_channels=8",
    "model.diffusion.unet.in_channels=16",
    "model.diffusion.unet.out_channels=8",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    shapes.write(shapes.generate(8, 0, "train"), out, "train", progress=False)
    return out


def _args(world, out, *extra):
    sets = [a for s in TINY + [f"data.path={world}", "data.num_workers=0"] for a in ("--set", s)]
    return [
        "--config",
        "configs/shapes.yaml",
        *sets,
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "4",
        *extra,
    ]


def test_vae_trains_and_scales_latents_to_unit_variance(world, tmp_path):
    assert main(_args(world, tmp_path / "vae")) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.config.latent_channels == 8 and vae.config.scaling_factor != 1.0


def test_vae_trains_under_bf16_autocast_to_float32_weights(world, tmp_path):
    assert main(_args(world, tmp_path / "vae", "--set", "train.autocast=bfloat16")) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in vae.parameters())


def test_decoder_fine_tuning_keeps_encoder_and_scale(world, tmp_path):
    assert main(_args(world, tmp_path / "vae")) == 0
    assert (
        main(
            _args(world, tmp_path / "dec", "--init", str(tmp_path / "vae"), "--decoder-only", "--lr", "1e-2")
        )
        == 0
    )
    a, b = AutoencoderKL.from_pretrained(tmp_path / "vae"), AutoencoderKL.from_pretrained(tmp_path / "dec")
    assert a.config.scaling_factor == b.config.scaling_factor
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(sa[k], sb[k]), k  # the latents a UNet was trained on are unchanged
    assert not all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))


def test_continued_training_moves_the_encoder_too(world, tmp_path):
    assert main(_args(world, tmp_path / "vae")) == 0
    assert main(_args(world, tmp_path / "more", "--init", str(tmp_path / "vae"), "--lr", "1e-2")) == 0
    a, b = AutoencoderKL.from_pretrained(tmp_path / "vae"), AutoencoderKL.from_pretrained(tmp_path / "more")
    assert not torch.equal(a.encoder.conv_in.weight, b.encoder.conv_in.weight)


def test_init_may_not_be_overwritten(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_args(world, tmp_path / "vae", "--init", str(tmp_path / "vae")))
    assert e.value.code == 2 and "--out must differ" in capsys.readouterr().err


def test_colour_augment_recolours_the_chosen_fraction_within_range():
    from train.vae import colour_augment

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    assert torch.equal(colour_augment(x, 0.0, torch.Generator().manual_seed(1)), x)
    a = colour_augment(x, 1.0, torch.Generator().manual_seed(1))
    b = colour_augment(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    changed = (a - x).abs().flatten(1).amax(1) > 1e-6
    assert changed.all()
    half = colour_augment(x, 0.5, torch.Generator().manual_seed(2))
    frac = ((half - x).abs().flatten(1).amax(1) > 1e-6).float().mean()
    assert 0.25 < frac < 0.75
