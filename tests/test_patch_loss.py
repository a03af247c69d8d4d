"""The auxiliary patch loss (``model.loss.patch_weight``, beyond the paper): a training-only linear
decoder reads each image feature the LLM receives and is scored against that patch's pixels."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mgie.config import ConfigError, validate

from .conftest import make_batch, make_model


def patch_cfg(tiny_cfg, weight: float = 0.5):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.loss.patch_weight = weight
    validate(cfg)
    return cfg


def test_patch_loss_scores_the_projector_features_against_their_own_patches(tiny_cfg, tokenizer):
    """The loss equals an independent recomputation: the projector's output (hooked) through the
    decoder against the pixels cut into row-major patches by reshaping; it joins the total with its
    weight, and its gradient reaches the projector."""
    cfg = patch_cfg(tiny_cfg)
    model = make_model(cfg, tokenizer)
    batch = make_batch(model)
    seen = []
    projector = next(m for n, m in model.mllm.named_modules() if n.endswith("multi_modal_projector"))
    projector.register_forward_hook(lambda mod, args, out: seen.append(out))
    for p in projector.parameters():
        p.requires_grad_(True)
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    v = cfg.model.mllm.vision
    g, p = v.image_size // v.patch_size, v.patch_size
    pix = batch["pixel_values"].float()  # (B, 3, S, S)
    truth = pix.view(len(pix), 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(len(pix), g * g, 3 * p * p)
    feats = seen[0].reshape(len(pix), g * g, -1)  # (B, P, D)
    want = F.mse_loss(model.patch_decoder(feats.float()), truth)
    torch.testing.assert_close(out.patch_loss, want)
    w = cfg.model.loss
    total = w.lm_weight * out.lm_loss + w.edit_weight * out.edit_loss + w.patch_weight * out.patch_loss
    torch.testing.assert_close(out.loss, total)
    model.zero_grad()
    out.patch_loss.backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in projector.parameters())
    assert model.patch_decoder.weight.grad.abs().sum() > 0


def test_without_the_weight_there_is_no_decoder_and_no_patch_loss(model, tokenizer):
    out = model(**make_batch(model), generator=torch.Generator().manual_seed(0))
    assert model.patch_decoder is None and out.patch_loss is None


def test_the_decoder_trains_with_the_mllm_and_is_kept_apart_for_continuations(tmp_path, tiny_cfg, tokenizer):
    """The decoder trains with the MLLM; a saved folder keeps it in its own file (none of the
    inference parts holds it), a run continued from the folder gets it back exactly, and a model
    built without the loss loads the folder and ignores the file."""
    from safetensors import safe_open

    from mgie.model import MGIEModel

    cfg = patch_cfg(tiny_cfg)
    model = make_model(cfg, tokenizer)
    ids = {id(q) for q in model.trainable_groups()["mllm"]}
    assert all(id(q) in ids for q in model.patch_decoder.parameters())
    with torch.no_grad():
        model.patch_decoder.weight.normal_()  # not what a fresh build draws
    out = tmp_path / "out"
    model.save_pretrained(out)
    for f in out.rglob("*.safetensors"):
        if f.name != "patch_decoder.safetensors":
            with safe_open(f, "pt") as st:
                assert not any("patch_decoder" in k for k in st.keys())
    again = MGIEModel.from_pretrained(out, adapters=True, cfg=cfg)
    torch.testing.assert_close(again.patch_decoder.weight, model.patch_decoder.weight)
    torch.testing.assert_close(again.patch_decoder.bias, model.patch_decoder.bias)
    plain = MGIEModel.from_pretrained(out, cfg=tiny_cfg)
    assert plain.patch_decoder is None


def test_a_patch_decoder_that_does_not_fit_is_a_checkpoint_error(tmp_path, tiny_cfg, tokenizer):
    from safetensors.torch import save_file

    from mgie.model import CheckpointError, MGIEModel

    cfg = patch_cfg(tiny_cfg)
    make_model(cfg, tokenizer).save_pretrained(tmp_path / "out")
    save_file(
        {"weight": torch.zeros(5, 3), "bias": torch.zeros(5)}, tmp_path / "out" / "patch_decoder.safetensors"
    )
    with pytest.raises(CheckpointError, match="patch_decoder.safetensors"):
        MGIEModel.from_pretrained(tmp_path / "out", cfg=cfg)


@pytest.mark.parametrize("weight, image", [(-0.1, True), (0.5, False)])
def test_config_refuses_a_bad_patch_weight(tiny_cfg, weight, image):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.loss.patch_weight = weight
    cfg.model.mllm.use_image = image
    with pytest.raises(ConfigError, match="patch_weight"):
        validate(cfg)


def test_patch_probe_reads_what_features_hold_and_nothing_more():
    """train/patch_probe.py: patch targets from a known image, and the probe's R^2 is near 1 for
    features that mix the targets linearly, near 0 (or below) for features that do not hold them."""
    from train.patch_probe import patch_targets, probe_r2

    pixels = torch.zeros(1, 3, 4, 4)
    pixels[0, 0, :2, 2:] = 1.0  # the top right 2 x 2 patch is red
    pixels[0, :, 2:, :2] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 2, 2).clone()
    pixels[0, 1, 3, 1] = 0.0  # the bottom left patch is green but one pixel
    t = patch_targets(pixels, 2)  # (4, 4): patches TL, TR, BL, BR
    torch.testing.assert_close(t[1], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(t[2, :3], torch.tensor([0.0, 0.75, 0]))
    assert t[2, 3] > 0 and t[0, 3] == 0
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3000, 4, generator=g)
    mixed = y @ torch.randn(4, 32, generator=g) + 0.01 * torch.randn(3000, 32, generator=g)
    assert (probe_r2(mixed, y) > 0.99).all()
    assert (probe_r2(torch.randn(3000, 32, generator=g), y) < 0.05).all()
