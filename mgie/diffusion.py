"""The InstructPix2Pix side of MGIE: UNet, VAE, schedulers, the editing loss and the sampler.

Latent conventions (IP2P, diffusers ``prepare_image_latents``): the source image latent is the
VAE posterior *mode*, unscaled; the target latent is a posterior *sample* times the VAE's
``scaling_factor``. The null image condition is an all-zero source latent.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from mgie.config import LossConfig, NoiseConfig, UNetConfig, VAEConfig

# Config settings -> the diffusers config key of the same setting: the ones that decide what a
# loaded folder's weights compute. A GroupNorm with other groups, or attention with other heads,
# loads the same tensors without complaint and computes something else.
UNET_KEYS = {
    k: k
    for k in (
        "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
        "layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups",
    )
}  # fmt: skip
VAE_KEYS = {k: k for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")}
VAE_KEYS["mid_block_attention"] = "mid_block_add_attention"
UNET_KEYS["pooled_condition"] = "class_embed_type"
# Settings whose diffusers value is not the config's own: config value -> diffusers value.
DIFFUSERS_VALUES = {"pooled_condition": lambda on: "projection" if on else None}


def architecture_mismatch(
    section: UNetConfig | VAEConfig, folder: dict, keys: dict[str, str], where: str
) -> str | None:
    """The first setting of ``keys`` where a diffusers ``folder`` config differs from the config
    ``section`` (named ``where``), as ``"its KEY=GOT differs from WHERE.ATTR=WANT"``; else ``None``.
    A key the folder's config lacks (an older diffusers) is not checked."""
    for attr, key in keys.items():
        if key not in folder:
            continue
        value = getattr(section, attr)
        want, got = DIFFUSERS_VALUES.get(attr, lambda v: v)(value), folder[key]
        if isinstance(got, tuple):  # diffusers may keep list settings as tuples
            got = list(got)
        if got != want:
            return f"its {key}={folder[key]} differs from {where}.{attr}={value}"
    return None


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet (8 input channels: noisy latent + source latent; plus
    ``coord_channels`` and ``map_channels``, see :func:`unet_input`).

    With ``zero_init_cross_attention`` the cross-attention output projections start at zero: the
    UNet then ignores the conditioning at first, and the gradient of each projection is the
    correlation of the (edit-head) values with the edit the loss wants (ControlNet's zero
    convolutions do the same). It does not, alone, keep a fast-learning edit head from collapsing
    to a constant output; see ``train.lr_edit_head`` in ``configs/shapes.yaml``.
    """
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
        class_embed_type=DIFFUSERS_VALUES["pooled_condition"](cfg.pooled_condition),
        projection_class_embeddings_input_dim=cfg.cross_attention_dim if cfg.pooled_condition else None,
    )
    if cfg.pooled_condition:  # starts as the UNet without it: the instruction adds to the time embedding
        nn.init.zeros_(unet.class_embedding.linear_2.weight)
        nn.init.zeros_(unet.class_embedding.linear_2.bias)
    if cfg.zero_init_cross_attention:
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):  # (C, C) Linear after the cross-attention
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
    return unet


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL."""
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor,
        mid_block_add_attention=cfg.mid_block_attention,
    )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def widen_conv_in(
    unet: UNet2DConditionModel, in_channels: int = 8, init_scale: float = 0.0
) -> UNet2DConditionModel:
    """Widen a UNet's ``conv_in`` to ``in_channels``; the new channels start at zero.

    This is the InstructPix2Pix recipe: at initialisation the widened UNet computes exactly what
    the original did, whatever the extra (source-latent) channels hold. ``init_scale > 0`` starts
    them instead at that multiple of the draw a fresh ``Conv2d`` of the new width would make
    (PyTorch's default init), so that they carry a signal the later layers can learn to use.
    """
    old = unet.conv_in
    if old.in_channels >= in_channels:
        raise ValueError(f"conv_in already has {old.in_channels} >= {in_channels} input channels")
    new = torch.nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.mul_(init_scale)  # (C_out, C_in, k, k), a default draw: 0 = the IP2P zeros
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def coordinates(batch: int, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Cell-centre coordinates, (B, 2, h, w): channel 0 is x (-1 at the left edge of the image,
    +1 at the right), channel 1 is y (-1 at the top, +1 at the bottom)."""
    ys = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height * 2 - 1  # (h,)
    xs = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width * 2 - 1  # (w,)
    grid = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)])  # (2, h, w)
    return grid.to(dtype or torch.float32).expand(batch, 2, height, width)


def run_unet(unet: UNet2DConditionModel, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction (B, 4, h, w) for input ``x`` (B, 8 + extra, h, w) at ``t`` under
    ``cond`` (B, Q, C); a UNet with a projection class embedding (``pooled_condition``) also gets
    the condition's mean over its Q tokens, (B, C). Training and sampling both call it."""
    cond = cond.to(unet.dtype)
    pooled_on = unet.config.class_embed_type == DIFFUSERS_VALUES["pooled_condition"](True)
    pooled = cond.mean(dim=1) if pooled_on else None  # (B, C)
    return unet(x, t, encoder_hidden_states=cond, class_labels=pooled).sample


def unet_input(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    source: torch.Tensor,
    edit_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's input, in its dtype: (B, 4, h, w) noisy latents + (B, 4, h, w) source latents
    -> (B, 8, h, w), the IP2P layout. The UNet's ``in_channels`` say what follows: two more
    (``coord_channels: 2``) are the cells' :func:`coordinates`; one more after those
    (``map_channels: 1``) is ``edit_map`` (B, 1, g, g) in [0, 1], upsampled (nearest) to (h, w),
    None = zeros, the map of the text-free condition. Training and sampling both call it."""
    x = torch.cat([latents, source], dim=1).to(unet.dtype)  # (B, 8, h, w)
    extra = unet.config.in_channels - x.shape[1]
    if extra not in (0, 1, 2, 3):
        raise ValueError(
            f"the UNet takes {unet.config.in_channels} input channels; expected {x.shape[1]} (latents)"
            " + 0 or 2 (coordinates) + 0 or 1 (edit map)"
        )
    b, _, h, w = x.shape
    parts = [x]
    if extra >= 2:
        parts.append(coordinates(b, h, w, x.device, x.dtype))  # (B, 2, h, w)
    if extra % 2:
        if edit_map is None:
            parts.append(x.new_zeros(b, 1, h, w))
        else:
            parts.append(F.interpolate(edit_map.to(x.dtype), size=(h, w), mode="nearest"))  # (B, 1, h, w)
    elif edit_map is not None:
        raise ValueError("an edit map was given, but the UNet has no input channel for it")
    return torch.cat(parts, dim=1)  # (B, 8 + 2? + 1?, h, w)


def noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training noise schedule (SD-1.5's DDPM: scaled-linear betas, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing,
    )


SCHEDULERS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}
NO_X0 = {"EulerAncestralDiscreteScheduler", "PNDMScheduler"}  # diffusers raises on prediction_type="sample"


def sampling_scheduler(name: str, cfg: NoiseConfig):
    """Any diffusers scheduler, by short name (``euler_ancestral``) or class name, on our betas."""
    import diffusers

    cls_name = SCHEDULERS.get(name, name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise ValueError(
            f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)} or a diffusers class name"
        )
    if cfg.prediction_type == "sample" and cls_name in NO_X0:
        raise ValueError(
            f"scheduler {name!r} cannot sample a model that predicts x0; use ddim, euler or dpm++"
        )
    return cls.from_config(noise_scheduler(cfg).config)


@torch.no_grad()
def encode_source(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 4, H/8, W/8) unscaled posterior mode."""
    return vae.encode(images.to(vae.dtype)).latent_dist.mode()


@torch.no_grad()
def encode_target(vae: AutoencoderKL, images: torch.Tensor, generator=None) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 4, H/8, W/8) scaled posterior sample."""
    return vae.encode(images.to(vae.dtype)).latent_dist.sample(generator) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in [0, 1]."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


# A pixel "changes" when a channel moves by more than this, in [0, 1] (as in metrics.edit_success).
CHANGE_TOL = 0.1


def changed_pixels(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 1, H, W), 1.0 where a channel moves by more than
    ``CHANGE_TOL`` of the [0, 1] range."""
    return ((target - source).abs().amax(1, keepdim=True) / 2 > CHANGE_TOL).float()


@torch.no_grad()
def change_weights(source: torch.Tensor, target: torch.Tensor, factor: int, weight: float) -> torch.Tensor:
    """Per-latent-cell loss weights: (B, 3, H, W) images in [-1, 1] -> (B, 1, H/factor, W/factor).

    A cell counts as changed when any pixel it covers changes by more than ``CHANGE_TOL``, or when
    a neighbouring cell does (the latents next to an edge also encode it). Changed cells weigh
    ``1 + weight`` times the others, normalised to a mean of 1 per example: the weights move an
    example's loss towards what its edit changes without scaling it (a global edit keeps weight 1
    everywhere).
    """
    cells = F.max_pool2d(changed_pixels(source, target), factor, factor)  # (B, 1, h, w)
    cells = F.max_pool2d(cells, 3, 1, padding=1)  # one cell of margin
    w = 1.0 + weight * cells
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


@torch.no_grad()
def edit_map_target(source: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """Where an edit changes the image: (B, 3, H, W) images in [-1, 1] -> (B, 1, grid, grid) in
    {0, 1}, a cell being 1 when any pixel in it changes by more than ``CHANGE_TOL``."""
    return F.adaptive_max_pool2d(changed_pixels(source, target), grid)  # (B, 1, g, g)


def dropout_masks(batch: int, cfg: LossConfig, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """IP2P conditioning dropout, per sample: ``(drop_text, drop_image)`` bool masks of shape (B,).

    With ``u ~ U(0, 1)``: ``u < p_t`` text only; ``p_t <= u < p_t + p_b`` both;
    ``p_t + p_b <= u < p_t + p_b + p_i`` image only (official mgie_llava.py L302-320).
    """
    u = torch.rand(batch, device=device, generator=generator)
    drop_text = u < cfg.drop_text + cfg.drop_both
    drop_image = (u >= cfg.drop_text) & (u < cfg.drop_text + cfg.drop_both + cfg.drop_image)
    return drop_text, drop_image


def edit_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    target_latents: torch.Tensor,
    source_latents: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
    edit_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The InstructPix2Pix denoising loss, with conditioning dropout.

    ``target_latents``/``source_latents`` (B, 4, h, w); ``cond`` (B, Q, C); ``null_cond`` (1 or B, Q, C);
    ``weights`` (B, 1, h, w) per-cell weights of the squared error (None: the plain mean, as IP2P);
    ``edit_map`` (B, 1, g, g) for a UNet with a map channel, part of the text condition: zeros
    where the text is dropped.
    """
    b, device = target_latents.shape[0], target_latents.device
    noise = torch.randn(target_latents.shape, device=device, dtype=target_latents.dtype, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=device, generator=generator)
    noisy = scheduler.add_noise(target_latents, noise, t)  # (B, 4, h, w)
    drop_text, drop_image = dropout_masks(b, cfg, device, generator)
    cond = torch.where(drop_text[:, None, None], null_cond.expand_as(cond).to(cond.dtype), cond)
    source = source_latents * (~drop_image).to(source_latents.dtype)[:, None, None, None]
    if edit_map is not None:
        edit_map = edit_map * (~drop_text).to(edit_map.dtype)[:, None, None, None]
    unet_in = unet_input(unet, noisy, source, edit_map)  # (B, 8 + extra, h, w)
    pred = run_unet(unet, unet_in, t, cond)  # (B, 4, h, w)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "sample":  # x0: the clean target latent
        target = target_latents
    else:
        target = scheduler.get_velocity(target_latents, noise, t)
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    return ((pred.float() - target.float()) ** 2 * weights.float()).mean()


def guided_noise(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    t,
    image_latents: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    guidance: float,
    image_guidance: float,
    edit_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Three-way classifier-free guidance of IP2P (diffusers IP2P pipeline, L441-447).

    ``eps = e(0,0) + s_T (e(img,txt) - e(img,0)) + s_I (e(img,0) - e(0,0))``, one UNet call on
    the batch ``[cond|img, null|img, null|0]``; it combines whatever the UNet predicts (noise,
    velocity or x0) the same way. ``latents`` are already scheduler-scaled. ``edit_map``
    (B, 1, g, g) goes with the text condition: the two text-free thirds get zeros.
    """
    x = torch.cat([latents] * 3)  # (3B, 4, h, w)
    img = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])  # (3B, 4, h, w)
    txt = torch.cat([cond, null_cond, null_cond])  # (3B, Q, C)
    maps = None if edit_map is None else torch.cat([edit_map, torch.zeros_like(edit_map).repeat(2, 1, 1, 1)])
    eps = run_unet(unet, unet_input(unet, x, img, maps), t, txt)  # (3B, 4, h, w)
    e_full, e_img, e_none = eps.chunk(3)
    return e_none + guidance * (e_full - e_img) + image_guidance * (e_img - e_none)


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    scheduler,
    image_latents: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    steps: int,
    guidance: float,
    image_guidance: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: Callable | None = None,
    edit_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise from pure noise to edited latents (B, 4, h, w), conditioned on the source latents.

    Mirrors the loop of diffusers' ``StableDiffusionInstructPix2PixPipeline.__call__`` (0.42),
    with the same random draws, so a shared generator gives the same image; tested against it.
    ``null_cond`` is (1 or B, Q, C); ``generator`` one or one per sample (as in diffusers);
    ``progress`` wraps the timestep iterable (e.g. tqdm); ``edit_map`` (B, 1, g, g) for a UNet
    with a map channel (:func:`unet_input`).
    """
    b = image_latents.shape[0]
    dtype, device = unet.dtype, image_latents.device
    cond, null_cond = cond.to(dtype), null_cond.to(dtype).expand_as(cond)
    image_latents = image_latents.to(dtype)
    scheduler.set_timesteps(steps, device=device)
    shape = (b, unet.config.out_channels, *image_latents.shape[-2:])
    latents = (
        randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
    )
    step_kwargs = (
        {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    )
    timesteps = scheduler.timesteps
    for t in progress(timesteps) if progress else timesteps:
        x = scheduler.scale_model_input(latents, t)  # (B, 4, h, w)
        eps = guided_noise(unet, x, t, image_latents, cond, null_cond, guidance, image_guidance, edit_map)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    return latents
