"""Named model presets: configs built in code, one registry.

- ``mgie-7b``: the exact paper architecture (LLaVA-7B v1: CLIP ViT-L/14-224 at layer -2, a single
  linear projector, LLaMA-7B; 8 [IMG] tokens; the 32M edit head; the SD-1.5 UNet with 8 input
  channels and the SD-1.5 VAE). These are the dataclass defaults.
- ``tiny``: a few-hundred-thousand-parameter model of the same structure for tests and CPU
  debugging, with a SentencePiece tokenizer trained in code (``tokens.build_tiny_tokenizer``).
"""

from __future__ import annotations

from collections.abc import Callable

from mgie.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EditHeadConfig,
    InferenceConfig,
    LoRAConfig,
    LossConfig,
    MGIEConfig,
    MLLMConfig,
    ModelConfig,
    NoiseConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    VisionConfig,
)

TINY_VOCAB = 512


def mgie_7b() -> MGIEConfig:
    """The paper's MGIE-7B architecture and defaults."""
    return MGIEConfig()


def tiny() -> MGIEConfig:
    """A tiny MGIE with the full structure, for tests and CPU smoke runs."""
    mllm = MLLMConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        text=TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            vocab_size=TINY_VOCAB,
        ),
        num_img_tokens=4,
    )
    diffusion = DiffusionConfig(
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=[32, 64],
            layers_per_block=1,
            attention_head_dim=8,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
        ),
        vae=VAEConfig(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64),
    )
    model = ModelConfig(
        mllm=mllm,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
        edit_head=EditHeadConfig(
            hidden_size=32,
            num_heads=2,
            num_encoder_layers=1,
            num_decoder_layers=1,
            ff_size=64,
            num_queries=16,
        ),
        diffusion=diffusion,
    )
    return MGIEConfig(model=model, inference=InferenceConfig(steps=20, max_new_tokens=16, max_side=256))


def mgie_shapes() -> MGIEConfig:
    """The small MGIE of the shapes world, trained from scratch (every MLLM weight trains).

    64 px images: a 4-layer CLIP-style ViT (patch 8: 64 image tokens), a 4-layer Llama (hidden
    256) over a 768-piece SentencePiece vocabulary trained on the world's text, no system line,
    8 [IMG] tokens, a 2+2-layer edit head, and a 3-level 8-channel UNet on the 32 x 32 x 4
    latents of a factor-2 VAE. The UNet predicts the clean latent (``prediction_type="sample"``;
    the edit is a deterministic function of image and instruction) on a zero-terminal-SNR
    schedule, sampled by 10 DDIM steps with trailing spacing.

    Both convolutional nets normalise with one group (``norm_num_groups=1``): with SD's 32 groups
    and these 32-channel layers every group is one channel, an instance norm that erases each
    channel's mean over the image, so a flat background's colour (a tint, a new background)
    could not pass the final norm before ``conv_out``. The UNet's cross-attention outputs start at
    zero (``zero_init_cross_attention``); the recipe trains the edit head at a tenth of the UNet's
    learning rate, or it collapses to a constant output (``configs/shapes.yaml``).
    """
    mllm = MLLMConfig(
        vision=VisionConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            image_size=64, patch_size=8,
        ),
        text=TextConfig(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, vocab_size=768,
        ),
        projector="mlp2x_gelu",
        trainable="full",
        system_prompt="",  # a chat-assistant preamble teaches a model trained from scratch nothing
    )  # fmt: skip
    diffusion = DiffusionConfig(
        unet=UNetConfig(
            in_channels=8, out_channels=4, sample_size=32, block_out_channels=[32, 64, 128], layers_per_block=1,
            attention_head_dim=8,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=128,
            norm_num_groups=1, zero_init_cross_attention=True,
        ),
        vae=VAEConfig(
            block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, sample_size=64,
            scaling_factor=1.0, mid_block_attention=False, norm_num_groups=1,
        ),
        noise=NoiseConfig(prediction_type="sample", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    )  # fmt: skip
    model = ModelConfig(
        mllm=mllm,
        lora=LoRAConfig(enabled=False),
        loss=LossConfig(change_weight=4.0),
        edit_head=EditHeadConfig(
            hidden_size=128,
            num_heads=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            ff_size=512,
            num_queries=16,
        ),
        diffusion=diffusion,
    )
    inference = InferenceConfig(
        steps=10,
        guidance=1.5,
        image_guidance=1.5,  # chosen on the validation set (2.0 until December 2026)
        scheduler="ddim",
        max_new_tokens=32,
        max_side=64,
        no_repeat_ngram_size=0,
    )
    data = DataConfig(dataset="shapes", crop_side=0, resolution=64, max_expressive_tokens=32)
    return MGIEConfig(model=model, inference=inference, data=data)


PRESETS: dict[str, Callable[[], MGIEConfig]] = {"mgie-7b": mgie_7b, "tiny": tiny, "mgie-shapes": mgie_shapes}


def get_preset(name: str) -> MGIEConfig:
    """The config of preset ``name``; ``ConfigError`` lists the known names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()
