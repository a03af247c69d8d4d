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
    DiffusionConfig,
    EditHeadConfig,
    InferenceConfig,
    LoRAConfig,
    MGIEConfig,
    MLLMConfig,
    ModelConfig,
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


PRESETS: dict[str, Callable[[], MGIEConfig]] = {"mgie-7b": mgie_7b, "tiny": tiny}


def get_preset(name: str) -> MGIEConfig:
    """The config of preset ``name``; ``ConfigError`` lists the known names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()
