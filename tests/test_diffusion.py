from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

from mgie.config import LossConfig, NoiseConfig
from mgie.diffusion import (
    build_unet,
    build_vae,
    change_weights,
    dropout_masks,
    edit_loss,
    encode_source,
    guided_noise,
    noise_scheduler,
    run_unet,
    sample,
    sampling_scheduler,
    widen_conv_in,
)
from mgie.images import to_pil, to_tensor

from .conftest import random_image


@pytest.fixture(scope="module")
def parts(tiny_cfg):
    torch.manual_seed(0)
    d = tiny_cfg.model.diffusion
    return build_unet(d.unet).eval(), build_vae(d.vae).eval()


@pytest.mark.parametrize(
    "scheduler, guidance, image_guidance, kind",
    [
        ("euler_ancestral", 7.5, 1.5, "epsilon"),
        ("euler_ancestral", 3.0, 1.2, "epsilon"),
        ("ddim", 7.5, 1.5, "epsilon"),
        ("euler", 2.0, 1.5, "sample"),  # euler_ancestral has no x0 mode in diffusers
        ("ddim", 2.0, 1.5, "sample"),
        ("ddim", 2.0, 1.5, "sample-zero-snr"),
    ],
)
def test_sampler_matches_diffusers_pipeline(parts, tiny_cfg, scheduler, guidance, image_guidance, kind):
    """Same UNet, VAE, scheduler, seed and embeddings: our loop == diffusers' IP2P pipeline."""
    unet, vae = parts
    zero_snr = kind.endswith("-zero-snr")
    noise = replace(
        tiny_cfg.model.diffusion.noise,
        prediction_type=kind.removesuffix("-zero-snr"),
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading",
    )
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 16, 32, generator=g)  # (B, Q, C)
    null = torch.randn(1, 16, 32, generator=g)
    images = [random_image(32, 24, seed=1), random_image(32, 24, seed=2)]

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=sampling_scheduler(scheduler, noise),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=images,
        prompt_embeds=cond,
        negative_prompt_embeds=null.expand(2, -1, -1),
        num_inference_steps=6,
        guidance_scale=guidance,
        image_guidance_scale=image_guidance,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images

    latents = sample(
        unet,
        sampling_scheduler(scheduler, noise),
        encode_source(vae, to_tensor(images)),
        cond,
        null,
        steps=6,
        guidance=guidance,
        image_guidance=image_guidance,
        generator=torch.Generator().manual_seed(7),
    )
    assert latents.shape == ref.shape == (2, 4, 3, 4)
    torch.testing.assert_close(latents, ref, rtol=1e-5, atol=1e-5)


def test_widen_conv_in_is_exact_at_init():
    torch.manual_seed(0)
    unet4 = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=32,
    ).eval()
    x, src, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        before = unet4(x, 10, c).sample
        unet8 = widen_conv_in(unet4, 8)
        after = unet8(torch.cat([x, src], 1), 10, c).sample
    assert unet8.config.in_channels == 8 and unet8.conv_in.weight.shape[1] == 8
    assert torch.equal(unet8.conv_in.weight[:, 4:], torch.zeros_like(unet8.conv_in.weight[:, 4:]))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        widen_conv_in(unet8, 8)


@pytest.mark.parametrize("zero", [False, True])
def test_zero_init_cross_attention_starts_blind_to_the_condition_and_learns(tiny_cfg, zero):
    torch.manual_seed(0)
    cfg = replace(tiny_cfg.model.diffusion.unet, zero_init_cross_attention=zero)
    unet = build_unet(cfg)
    outs = [m for n, m in unet.named_modules() if n.endswith("attn2.to_out.0")]
    assert outs and all(bool((m.weight == 0).all() and (m.bias == 0).all()) == zero for m in outs)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    c1, c2 = torch.randn(2, 2, 5, cfg.cross_attention_dim)
    p1, p2 = unet(x, 10, c1).sample, unet(x, 10, c2).sample
    assert torch.equal(p1, p2) == zero  # zeroed: the condition cannot reach the output yet
    p1.square().mean().backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in outs)  # ... but the projections learn


def test_pooled_condition_starts_as_the_plain_unet_and_then_adds_the_mean_condition(tiny_cfg):
    """``pooled_condition``: a projection class embedding whose last layer starts at zero, so the
    UNet first computes exactly what the same weights compute without it; once that layer moves,
    ``run_unet`` feeds it the condition's mean over tokens: conditions with the same mean give the
    same output through it (the cross-attention zeroed), different means do not, and the result
    equals diffusers' own call with ``class_labels`` given by hand."""
    torch.manual_seed(0)
    base = replace(tiny_cfg.model.diffusion.unet, zero_init_cross_attention=True)
    plain = build_unet(base)
    torch.manual_seed(0)
    pooled = build_unet(replace(base, pooled_condition=True))
    assert pooled.config.class_embed_type == "projection" and plain.config.class_embed_type is None
    emb = pooled.class_embedding  # linear_1 (C -> T), SiLU, linear_2 (T -> T)
    assert not emb.linear_2.weight.any() and not emb.linear_2.bias.any()
    pooled.load_state_dict(plain.state_dict(), strict=False)  # the shared weights
    x = torch.randn(2, base.in_channels, base.sample_size, base.sample_size)
    c = torch.randn(2, 5, base.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(run_unet(pooled, x, 10, c), plain(x, 10, c).sample, rtol=0, atol=0)
        torch.nn.init.normal_(emb.linear_2.weight)
        shuffled = c[:, torch.randperm(5)]  # the same mean over tokens
        moved = c + torch.randn(2, 1, base.cross_attention_dim)  # another mean
        out = run_unet(pooled, x, 10, c)
        torch.testing.assert_close(run_unet(pooled, x, 10, shuffled), out, rtol=1e-5, atol=1e-5)
        assert (run_unet(pooled, x, 10, moved) - out).abs().max() > 1e-3
        torch.testing.assert_close(out, pooled(x, 10, c, class_labels=c.mean(1)).sample)
        # Sampling's three-way guidance passes each third its own pooled condition.
        lat, img = x[:, :4], x[:, 4:8]
        null = torch.zeros(1, 5, base.cross_attention_dim)
        got = guided_noise(pooled, lat, 10, img, c, null.expand_as(c), 2.0, 1.5)
        thirds = [pooled(torch.cat([lat, i], 1), 10, t, class_labels=t.mean(1)).sample for i, t in
                  ((img, c), (img, null.expand_as(c)), (torch.zeros_like(img), null.expand_as(c)))]  # fmt: skip
        want = thirds[2] + 2.0 * (thirds[0] - thirds[1]) + 1.5 * (thirds[1] - thirds[2])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_masks_partition_and_rates():
    cfg = LossConfig(drop_text=0.05, drop_both=0.05, drop_image=0.05)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    text, image = dropout_masks(n, cfg, "cpu", g)
    # Same draws, recomputed from the official description.
    assert torch.equal(text, u < 0.10) and torch.equal(image, (u >= 0.05) & (u < 0.15))
    rates = [(text & ~image).float().mean(), (text & image).float().mean(), (~text & image).float().mean()]
    for r in rates:
        assert abs(float(r) - 0.05) < 0.003


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_edit_loss_matches_manual_computation(parts, tiny_cfg, kind, weighted):
    """The loss equals an independent recomputation from the same random draws (float64 add_noise),
    for each prediction type: noise, the clean latent x0, or v = sqrt(abar) noise - sqrt(1 - abar) x0;
    with per-cell weights, the weighted mean of the squared errors."""
    unet, _ = parts
    sched = noise_scheduler(replace(tiny_cfg.model.diffusion.noise, prediction_type=kind))
    g = torch.Generator().manual_seed(3)
    tgt, src = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    cond, null = torch.randn(4, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    w = 1 + 5 * (torch.rand(4, 1, 4, 4, generator=g) > 0.7).float() if weighted else None
    cfg = LossConfig(drop_text=0.25, drop_both=0.25, drop_image=0.25)
    loss = edit_loss(unet, sched, tgt, src, cond, null, cfg, torch.Generator().manual_seed(9), w)

    r = torch.Generator().manual_seed(9)  # replay the draws in the documented order
    noise = torch.randn(tgt.shape, generator=r)
    t = torch.randint(0, 1000, (4,), generator=r)
    u = torch.rand(4, generator=r)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    noisy = (abar.sqrt() * tgt.double() + (1 - abar).sqrt() * noise.double()).float()
    c = torch.where((u < 0.5)[:, None, None], null.expand_as(cond), cond)
    s = src * (~((u >= 0.25) & (u < 0.75))).float()[:, None, None, None]
    with torch.no_grad():
        pred = unet(torch.cat([noisy, s], 1), t, c).sample
    v = (abar.sqrt() * noise.double() - (1 - abar).sqrt() * tgt.double()).float()
    want = {"epsilon": noise, "sample": tgt, "v_prediction": v}[kind]
    se = (pred.double() - want.double()) ** 2  # (4, 4, 4, 4)
    if weighted:
        se = torch.stack([se[:, c] * w[:, 0].double() for c in range(4)], 1)
    torch.testing.assert_close(loss.double(), se.mean(), rtol=1e-4, atol=1e-5)


def test_change_weights_mark_the_changed_cells_and_their_neighbours():
    """Against a direct loop: a cell (2 x 2 px) is changed when a pixel in it moves by > 0.1 (in
    [0, 1]), every cell next to a changed one (8-neighbourhood) gets the weight too, and each
    example's weights average to 1."""
    g = torch.Generator().manual_seed(0)
    src = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    tgt = src.clone()
    tgt[0, 1, 5, 9] += 0.5  # 0.25 in [0, 1]: changed
    tgt[0, 0, 12, 2] += 0.15  # 0.075: below the tolerance
    tgt[1, :, 0:4, 14:16] = -src[1, :, 0:4, 14:16]  # a block at the edge
    tgt[2] = -src[2]  # everything changes (a global edit)
    got = change_weights(src, tgt, 2, 4.0)
    assert got.shape == (3, 1, 8, 8)
    diff = ((tgt - src).abs() / 2).amax(1)  # (3, 16, 16)
    for b in range(3):
        changed = {(i // 2, j // 2) for i in range(16) for j in range(16) if diff[b, i, j] > 0.1}
        near = [
            [any(abs(i - a) <= 1 and abs(j - c) <= 1 for a, c in changed) for j in range(8)] for i in range(8)
        ]
        n = sum(map(sum, near))
        mean = (64 + 4.0 * n) / 64
        for i in range(8):
            for j in range(8):
                want = (5.0 if near[i][j] else 1.0) / mean
                assert got[b, 0, i, j].item() == pytest.approx(want), (b, i, j)
    assert got[0, 0, 2, 4] > got[0, 0, 6, 1]  # the changed pixel's cell vs a cell below the tolerance
    assert torch.allclose(got[2], torch.ones(1, 8, 8))  # a global edit keeps the plain loss


def test_scheduler_by_name_and_error():
    noise = NoiseConfig()
    assert type(sampling_scheduler("euler_ancestral", noise)).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(sampling_scheduler("DDIMScheduler", noise)).__name__ == "DDIMScheduler"
    s = sampling_scheduler("dpm++", noise)
    assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="unknown scheduler"):
        sampling_scheduler("nope", noise)
    with pytest.raises(ValueError, match="cannot sample a model that predicts x0"):
        sampling_scheduler("euler_ancestral", NoiseConfig(prediction_type="sample"))


def test_image_tensor_round_trip():
    img = random_image(16, 8)
    x = to_tensor([img])
    assert x.shape == (1, 3, 8, 16) and x.min() >= -1 and x.max() <= 1
    assert to_pil((x + 1) / 2)[0].tobytes() == img.tobytes()


def test_zero_terminal_snr_schedule_ends_in_pure_noise():
    cfg = NoiseConfig(prediction_type="sample", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    train = noise_scheduler(cfg)
    assert (
        float(train.alphas_cumprod[-1]) < 1e-6
        and float(noise_scheduler(NoiseConfig()).alphas_cumprod[-1]) > 1e-3
    )
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(train.add_noise(x0, noise, torch.tensor([999, 999])), noise, atol=1e-3, rtol=0)
    sampler = sampling_scheduler("ddim", cfg)
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == 999  # sampling starts where training saw pure noise
