"""The predicted edit map (``model.edit_head.map_grid`` + ``unet.map_channels``, beyond the paper)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mgie.config import ConfigError, load_config, validate
from mgie.diffusion import build_unet, edit_map_target, guided_noise, unet_input
from mgie.model import CheckpointError, MGIEModel
from mgie.pipeline import MGIEPipeline
from train.optim import param_groups

from .conftest import make_batch, make_model, random_image


def map_cfg(tiny_cfg, coord: int = 0, weight: float = 0.1, teacher: float = 0.5):
    """The tiny config with an edit map (grid 4) and optionally coordinates."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.edit_head.map_grid = 4
    u = cfg.model.diffusion.unet
    u.coord_channels, u.map_channels, u.in_channels = coord, 1, 9 + coord
    cfg.model.loss.map_weight, cfg.model.loss.map_teacher = weight, teacher
    validate(cfg)
    return cfg


def test_edit_map_target_marks_the_cells_that_change():
    """Independent count: one pixel moved past the tolerance marks its cell only; a smaller move
    (0.05 of the range, under CHANGE_TOL = 0.1) marks nothing."""
    src = torch.zeros(2, 3, 8, 8)
    tgt = src.clone()
    tgt[0, 1, 5, 2] = 0.3  # 0.15 of the [0, 1] range: row 5 -> cell row 2, column 2 -> cell 1
    tgt[1, :, :, :] = 0.1  # 0.05 everywhere
    got = edit_map_target(src, tgt, 4)  # (B, 1, 4, 4)
    want = torch.zeros(2, 1, 4, 4)
    want[0, 0, 2, 1] = 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("coord", [0, 2])
def test_unet_input_appends_the_upsampled_map_last(tiny_cfg, coord):
    cfg = map_cfg(tiny_cfg, coord)
    unet = build_unet(cfg.model.diffusion.unet)
    x, src = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    emap = torch.rand(2, 1, 4, 4)
    got = unet_input(unet, x, src, emap)  # (B, 9 or 11, h, w)
    assert got.shape == (2, 9 + coord, 8, 8)
    assert torch.equal(got[:, :4], x) and torch.equal(got[:, 4:8], src)
    up = emap.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, by hand
    assert torch.equal(got[:, -1:], up)
    assert torch.equal(unet_input(unet, x, src)[:, -1], torch.zeros(2, 8, 8))  # None: the null map
    with pytest.raises(ValueError, match="no input channel"):
        unet_input(build_unet(tiny_cfg.model.diffusion.unet), x, src, emap)


def test_guidance_gives_the_map_to_the_text_conditioned_third_only(tiny_cfg):
    cfg = map_cfg(tiny_cfg)
    unet = build_unet(cfg.model.diffusion.unet).eval()
    seen = []
    unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    emap = torch.rand(2, 1, 4, 4) + 0.1
    cond = torch.randn(2, 5, cfg.model.diffusion.unet.cross_attention_dim)
    with torch.no_grad():
        guided_noise(unet, torch.randn(2, 4, 8, 8), 10, torch.randn(2, 4, 8, 8), cond, cond, 2.0, 1.5, emap)
    full, img, none = seen[0][:, 8].chunk(3)  # (B, h, w) each
    assert torch.equal(full, F.interpolate(emap, size=(8, 8))[:, 0])
    assert not img.any() and not none.any()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"unet": {"map_channels": 1, "in_channels": 9}}, "go together"),
        ({"edit_head": {"map_grid": 4}}, "go together"),
        ({"edit_head": {"map_grid": 4}, "unet": {"map_channels": 1}}, "in_channels must be"),
        ({"edit_head": {"map_grid": 4}, "unet": {"map_channels": 2, "in_channels": 10}}, "0 or 1"),
        ({"loss": {"map_teacher": 1.5}}, "map_teacher"),
    ],
)
def test_config_refuses_inconsistent_map_settings(tiny_cfg, change, message):
    cfg = copy.deepcopy(tiny_cfg)
    for section, values in change.items():
        target = cfg.model.diffusion.unet if section == "unet" else getattr(cfg.model, section)
        for k, v in values.items():
            setattr(target, k, v)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_training_loss_adds_the_map_bce_and_feeds_the_true_map(tiny_cfg, tokenizer):
    """loss = lm + edit + map_weight * BCE(prediction, changed cells), recomputed here; with
    map_teacher 1 and no dropout the UNet reads the true map; the BCE reaches the map MLP and,
    through the condition, the edit head."""
    cfg = map_cfg(tiny_cfg, weight=0.3, teacher=1.0)
    cfg.model.loss.drop_text = cfg.model.loss.drop_both = cfg.model.loss.drop_image = 0.0
    model = make_model(cfg, tokenizer)
    batch = make_batch(model)
    batch["target"] = batch["source"].clone()
    batch["target"][:, :, 20:, :10] = -batch["target"][:, :, 20:, :10]  # a change in the bottom left
    seen = []
    model.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    w = cfg.model.loss
    truth = edit_map_target(batch["source"], batch["target"], 4)
    assert truth.sum() > 0 and truth.sum() < truth.numel()
    torch.testing.assert_close(
        out.loss, w.lm_weight * out.lm_loss + w.edit_weight * out.edit_loss + 0.3 * out.map_loss
    )
    with torch.no_grad():
        _, hidden = model.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        cond = model.condition(hidden, batch["input_ids"], batch["labels"] != -100)
        want = F.binary_cross_entropy_with_logits(model.edit_head.edit_map(cond), truth)
    torch.testing.assert_close(out.map_loss, want)
    h = seen[0].shape[-1]
    assert torch.equal(seen[0][:, 8:9], F.interpolate(truth, size=(h, h)))
    model.zero_grad()
    out.map_loss.backward()
    assert model.edit_head.map_head[0].weight.grad.abs().sum() > 0
    assert model.edit_head.hid2feat.weight.grad.abs().sum() > 0


def test_the_map_mlp_has_its_own_group_at_the_unet_rate(tiny_cfg, tokenizer):
    cfg = map_cfg(tiny_cfg)
    cfg.train.lr, cfg.train.lr_edit_head, cfg.train.lr_unet = 1e-3, 1e-5, 0.0
    model = make_model(cfg, tokenizer)
    groups = model.trainable_groups()
    assert {id(p) for p in groups["edit_map"]} == {id(p) for p in model.edit_head.map_head.parameters()}
    assert not {id(p) for p in groups["edit_map"]} & {id(p) for p in groups["edit_head"]}
    lrs = {g["name"]: g["lr"] for g in param_groups(groups, cfg)}
    assert lrs["edit_map"] == 1e-3 and lrs["edit_head"] == 1e-5


def test_a_map_model_saves_loads_and_edits(tmp_path, tiny_cfg, tokenizer):
    """The map MLP travels in edit_head.safetensors; the loaded pipeline predicts the same map
    and edits; a head file without the MLP's weights is refused."""
    cfg = map_cfg(tiny_cfg)
    model = make_model(cfg, tokenizer, adapters=False)
    model.save_pretrained(tmp_path / "m")
    loaded = MGIEModel.from_pretrained(tmp_path / "m")
    cond = torch.randn(2, cfg.model.edit_head.num_queries, cfg.model.diffusion.unet.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(loaded.edit_map(cond), model.edit_map(cond))
    assert loaded.edit_map(cond).shape == (2, 1, 4, 4)
    out = MGIEPipeline(loaded)(
        [random_image(32, 32, seed=1)], ["remove the red square"], steps=2, progress=False
    )
    assert out.images[0].size == (32, 32)
    path = tmp_path / "m" / "edit_head.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("map_head.")}, path)
    with pytest.raises(CheckpointError, match="edit_head.safetensors"):
        MGIEModel.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("coord", [0, 2])
def test_training_starts_a_map_run_from_a_folder_without_one(tmp_path, tiny_cfg, tokenizer, coord):
    """``train.init_from`` an 8-channel folder, config asking for the map (and coordinates): the
    UNet is widened with zero weights, the head gains a fresh map MLP, and the model computes what
    the folder's did whatever the map holds."""
    from train.run import load_init_from

    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    ref = MGIEModel.from_pretrained(tmp_path / "ckpt")
    cfg = map_cfg(load_config(tmp_path / "ckpt" / "config.yaml"), coord)
    cfg.train.init_from = str(tmp_path / "ckpt")
    model = load_init_from(cfg)
    assert model.unet.config.in_channels == 9 + coord and hasattr(model.edit_head, "map_head")
    g = torch.Generator().manual_seed(3)
    x, src = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 5, tiny_cfg.model.diffusion.unet.cross_attention_dim, generator=g)
    with torch.no_grad():
        got = model.unet(unet_input(model.unet, x, src, torch.rand(2, 1, 4, 4, generator=g)), 10, c).sample
        want = ref.unet(unet_input(ref.unet, x, src), 10, c).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "map")
    assert MGIEModel.from_pretrained(tmp_path / "map").cfg.model.edit_head.map_grid == 4
