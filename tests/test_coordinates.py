"""Coordinate channels of the UNet (``model.diffusion.unet.coord_channels``, beyond the paper)."""

from dataclasses import replace

import pytest
import torch

from mgie.config import load_config
from mgie.diffusion import (
    build_unet,
    coordinates,
    edit_loss,
    noise_scheduler,
    sample,
    sampling_scheduler,
    unet_input,
    widen_conv_in,
)

from .conftest import make_model


def test_coordinates_are_the_cell_centres():
    """Independent formula: cell j of n has its centre at (j + 1/2) / n of the side, mapped to [-1, 1]."""
    c = coordinates(3, 4, 2)  # (B, 2, h, w)
    assert c.shape == (3, 2, 4, 2) and c.dtype == torch.float32
    for i in range(4):
        for j in range(2):
            assert c[2, 0, i, j].item() == pytest.approx(-1 + (2 * j + 1) / 2)  # x: left -> right
            assert c[2, 1, i, j].item() == pytest.approx(-1 + (2 * i + 1) / 4)  # y: top -> bottom
    assert c[:, 0].sum().item() == pytest.approx(0) and c[:, 1].sum().item() == pytest.approx(0)


@pytest.mark.parametrize("coord", [0, 2])
def test_unet_input_is_ip2p_layout_plus_the_coordinates(tiny_cfg, coord):
    cfg = replace(tiny_cfg.model.diffusion.unet, in_channels=8 + coord, coord_channels=coord)
    unet = build_unet(cfg).double()
    x, src = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    got = unet_input(unet, x, src)
    assert got.shape == (2, 8 + coord, 6, 5) and got.dtype == torch.float64
    assert torch.equal(got[:, :4], x.double()) and torch.equal(got[:, 4:8], src.double())
    if coord:
        assert torch.equal(got[:, 8:], coordinates(2, 6, 5, dtype=torch.float64))


def test_a_unet_with_another_channel_count_is_refused(tiny_cfg):
    unet = build_unet(replace(tiny_cfg.model.diffusion.unet, in_channels=12))
    with pytest.raises(ValueError, match="takes 12 input channels"):
        unet_input(unet, torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4))


def test_widened_unet_computes_what_it_did_and_learns_the_coordinates(tiny_cfg):
    """How a pack gains coordinate channels (train/run.py ``load_init_from``): zero weights for
    them, so the UNet's output is unchanged (float64), and a gradient that reaches them."""
    torch.manual_seed(0)
    unet8 = build_unet(tiny_cfg.model.diffusion.unet).double()
    x, src = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    c = torch.randn(2, 5, tiny_cfg.model.diffusion.unet.cross_attention_dim, dtype=torch.float64)
    with torch.no_grad():
        before = unet8(unet_input(unet8, x, src), 10, c).sample
    unet10 = widen_conv_in(unet8, 10)
    after = unet10(unet_input(unet10, x, src), 10, c).sample
    assert torch.equal(after, before)
    after.square().mean().backward()
    assert unet10.conv_in.weight.grad[:, 8:].abs().sum() > 0


def test_coordinates_reach_training_and_sampling(tiny_cfg):
    """With the coordinate weights set, the loss and the sampler both see where each cell is: a
    UNet that reads only the coordinates predicts differently at the left and right edges."""
    torch.manual_seed(0)
    cfg = replace(tiny_cfg.model.diffusion.unet, in_channels=10, coord_channels=2)
    unet = build_unet(cfg).eval()
    with torch.no_grad():
        unet.conv_in.weight[:, :8] = 0  # the latents are invisible: only the coordinates vary
    sched = sampling_scheduler("ddim", tiny_cfg.model.diffusion.noise)
    zeros = torch.zeros(1, 4, 8, 8)
    cond = torch.zeros(1, 5, cfg.cross_attention_dim)
    out = sample(unet, sched, zeros, cond, cond, steps=2, guidance=1.0, image_guidance=1.0,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    loss = edit_loss(unet, noise_scheduler(tiny_cfg.model.diffusion.noise), zeros, zeros, cond, cond,
                     tiny_cfg.model.loss, torch.Generator().manual_seed(0))  # fmt: skip
    loss.backward()
    assert unet.conv_in.weight.grad[:, 8:].abs().sum() > 0
    assert not torch.allclose(out[..., 0], out[..., -1])  # the left column differs from the right


def test_training_starts_a_coordinate_run_from_a_folder_without_them(tmp_path, tiny_cfg, tokenizer):
    """``train.init_from`` naming an 8-channel checkpoint, config asking for coordinates: the
    UNet is widened and computes what the checkpoint's does; the config is the run's."""
    from mgie.model import MGIEModel
    from train.run import load_init_from

    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    ref = MGIEModel.from_pretrained(tmp_path / "ckpt")
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    cfg.model.diffusion.unet.in_channels, cfg.model.diffusion.unet.coord_channels = 10, 2
    cfg.train.init_from = str(tmp_path / "ckpt")
    model = load_init_from(cfg)
    assert model.unet.config.in_channels == 10 and model.cfg.model.diffusion.unet.coord_channels == 2
    g = torch.Generator().manual_seed(3)
    x, src = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 5, tiny_cfg.model.diffusion.unet.cross_attention_dim, generator=g)
    with torch.no_grad():
        got = model.unet(unet_input(model.unet, x, src), 10, c).sample
        want = ref.unet(unet_input(ref.unet, x, src), 10, c).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "wide")  # and the run's export loads as what it is
    assert MGIEModel.from_pretrained(tmp_path / "wide").unet.config.in_channels == 10
    plain = load_config(tmp_path / "ckpt" / "config.yaml")
    plain.train.init_from = str(tmp_path / "wide")
    with pytest.raises(ValueError, match="in_channels=10 differs"):  # no silent narrowing
        load_init_from(plain)


def test_coordinate_weights_can_start_from_a_scaled_default_draw(tiny_cfg):
    """``init_scale``: the new weights are that multiple of a default Conv2d draw, uniform within
    +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)); the old ones are kept."""
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg.model.diffusion.unet)
    old = unet.conv_in.weight.detach().clone()
    wide = widen_conv_in(unet, 10, init_scale=0.5)
    w = wide.conv_in.weight.detach()
    bound = 1 / (10 * 3 * 3) ** 0.5  # fan_in of the widened conv
    new = w[:, 8:]
    assert torch.equal(w[:, :8], old)
    assert new.abs().max() <= 0.5 * bound and new.abs().max() > 0.4 * bound
    assert abs(new.abs().mean().item() - 0.25 * bound) < 0.05 * bound  # mean |U(-b, b)| = b / 2


def test_coord_init_reaches_the_widened_unet(tmp_path, tiny_cfg, tokenizer):
    from train.run import load_init_from

    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    cfg = load_config(tmp_path / "ckpt" / "config.yaml", overrides=["train.coord_init=1.0"])
    cfg.model.diffusion.unet.in_channels, cfg.model.diffusion.unet.coord_channels = 10, 2
    cfg.train.init_from = str(tmp_path / "ckpt")
    assert load_init_from(cfg).unet.conv_in.weight[:, 8:].abs().min() > 0
