"""The one typed configuration tree of mgie.

Dataclass defaults are the paper's MGIE-7B architecture and recipe (see
``shared/docs/mgie-reference.md``). YAML files and ``--set a.b=c`` overrides only *override*
those defaults; unknown keys and wrong types raise :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mgie.tokens import SYSTEM


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    """CLIP vision tower (default: ViT-L/14 at 224 px, as in LLaVA-7B-v1)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5


@dataclass
class TextConfig:
    """Llama language model (default: LLaMA-7B / Vicuna-7B v1.1)."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    vocab_size: int = 32000  # base vocabulary, before the MGIE tokens are appended


@dataclass
class MLLMConfig:
    """The multimodal LLM: LLaVA (vision tower + projector + Llama) plus the [IMG] tokens."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vision_feature_layer: int = -2  # penultimate CLIP layer, CLS dropped
    projector: Literal["linear", "mlp2x_gelu"] = "linear"  # LLaVA-v1: one Linear; LLaVA-1.5: MLP
    num_img_tokens: int = 8  # [IMG0] .. [IMG{N-1}]
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    tokenizer: str = ""  # LLaMA tokenizer folder for a model built from scratch; "" = built-in tiny one
    trainable: Literal["adapters", "full"] = "adapters"  # adapters: LoRA + [IMG] rows; full: every weight
    use_image: bool = True  # false: the LLM never sees the image (the paper's LGIE baseline)
    expressive: bool = True  # false: no expressive text, the LLM only encodes the instruction (IP2P baseline)
    system_prompt: str = SYSTEM  # the Vicuna v1.1 system line of the prompt; "" leaves it out


@dataclass
class LoRAConfig:
    """LoRA on the language model (peft); the [IMG] rows of embeddings and LM head always train."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class QuantizationConfig:
    """k-bit loading of the language model through bitsandbytes (QLoRA); 0 = off."""

    bits: Literal[0, 4, 8] = 0
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


@dataclass
class EditHeadConfig:
    """The MGIE edit head: a seq2seq Transformer from [IMG] states to UNet conditioning."""

    hidden_size: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    ff_size: int = 2048
    dropout: float = 0.0
    num_queries: int = 77  # the CLIP text length the UNet was trained with
    # Beyond the paper: the head also reads the expressive text's tokens (last-layer states plus
    # input embeddings, with sinusoidal positions), not only the [IMG] states. A small LLM trained
    # from scratch keeps little of an early word in its [IMG] states (mgie-shapes: swapping the
    # colour of an "add" moves its conditioning by 0.03%, train/word_probe.py).
    read_text: bool = False
    # Beyond the paper: > 0 adds a map head (mgie.edit_head.MapHead: map_grid x map_grid cell
    # queries attending to the [IMG] states and the text tokens the head reads) that predicts where
    # the edit changes the image (trained with model.loss.map_weight against the changed pixels);
    # the UNet reads the map as one more input channel (model.diffusion.unet.map_channels: 1). The
    # cross-attention alone must turn "the top left corner" into a place; mgie-shapes drew the same
    # image whichever corner an add asked for.
    map_grid: int = 0
    # The map head also reads the LLM's last-layer states at the image patches, with learned
    # positions: where "the red square" is must be seen. Needs model.mllm.use_image.
    map_image: bool = False
    # Each map cell's query also holds the LLM's last-layer states at the image patches under it:
    # a cell sees what it holds and asks the text whether that is what the edit names.
    map_cells: bool = False


@dataclass
class UNetConfig:
    """InstructPix2Pix UNet (default: SD-1.5 with an 8-channel ``conv_in``)."""

    in_channels: int = 8
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    )
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    # From-scratch training only: start every cross-attention output projection (attn2.to_out) at
    # zero, so the UNet reads the still-random conditioning only as far as the loss asks.
    zero_init_cross_attention: bool = False
    # Beyond the paper: 2 appends the latent cell's (x, y) coordinates in [-1, 1] as the last two
    # input channels (CoordConv), so that the UNet knows where in the image a cell is; a convolution
    # knows it only from the zero padding, and mgie-shapes drew an added object in the wrong corner.
    # in_channels then counts them: 2 x latent channels + coord_channels.
    coord_channels: int = 0
    # Beyond the paper: 1 appends the edit head's predicted edit map (model.edit_head.map_grid),
    # upsampled to the latent grid, after the coordinates; zeros for the text-free condition.
    # in_channels = 2 x latent channels + coord_channels + map_channels.
    map_channels: int = 0
    # Beyond the paper: true adds the condition's mean over its tokens, (B, C), through a
    # two-layer projection (diffusers' class_embed_type "projection", last layer at zero) to the
    # timestep embedding, so that every ResNet block is modulated by the instruction (FiLM-like):
    # a global edit (brightness, tint) needs one vector for the whole image, which cross-attention
    # at two low-resolution levels learns slowly from scratch.
    pooled_condition: bool = False


@dataclass
class VAEConfig:
    """AutoencoderKL (default: SD-1.5)."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    mid_block_attention: bool = True


@dataclass
class NoiseConfig:
    """Noise schedule shared by training (DDPM) and sampling (any diffusers scheduler)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"  # sample = x0
    # Zero terminal SNR (Lin et al. 2024): the last training step is pure noise, so the sampler's
    # pure-noise start is in distribution (needs v or x0 prediction and "trailing" spacing).
    rescale_betas_zero_snr: bool = False
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"


@dataclass
class DiffusionConfig:
    """The diffusion side: UNet, VAE and noise schedule."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class LossConfig:
    """Loss weights and InstructPix2Pix conditioning dropout (paper Eq. 6; 5%/5%/5%)."""

    lm_weight: float = 1.0
    edit_weight: float = 0.5
    drop_text: float = 0.05  # text -> null condition only
    drop_both: float = 0.05  # text and image both null
    drop_image: float = 0.05  # image -> zero latent only
    # Beyond the paper: latent cells the edit changes weigh 1 + change_weight in the editing loss,
    # so that the few cells of a local edit are not drowned by the many the UNet only copies.
    change_weight: float = 0.0
    # Beyond the paper (model.edit_head.map_grid > 0): weight of the edit map's binary
    # cross-entropy against the cells the edit changes, and the share of rows whose UNet reads the
    # true map in training instead of the prediction (detached), so that it learns to trust a map
    # before the head draws good ones.
    map_weight: float = 0.0
    map_teacher: float = 0.5
    # Beyond the paper: weight of an auxiliary loss that keeps the image features local. A linear
    # decoder (training only; exports keep it for continued runs) reads each patch's feature as
    # the LLM receives it (the projector's output) and is scored by the MSE against that patch's
    # (CLIP-normalised) pixels. Needs model.mllm.use_image.
    patch_weight: float = 0.0


@dataclass
class ModelConfig:
    """Everything needed to build an MGIE model."""

    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    edit_head: EditHeadConfig = field(default_factory=EditHeadConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ----------------------------------------------------------------------------- inference


@dataclass
class InferenceConfig:
    """Defaults of ``MGIEPipeline`` and ``python -m mgie.edit`` (the official demo's values)."""

    steps: int = 100
    guidance: float = 7.5  # text guidance s_T
    image_guidance: float = 1.5  # image guidance s_I
    scheduler: str = "euler_ancestral"
    max_new_tokens: int = 96
    no_repeat_ngram_size: int = 3
    max_side: int = 512  # the longer image side is brought down to this (multiple of 8)
    seed: int = 13331
    # Beyond the paper: > 0 gives back the source's own full-resolution pixels wherever the edit
    # left the image alone (latent cells whose mean colour moved by at most this, in [0, 1], and
    # not next to one that moved; mgie.images.keep_unchanged). 0 = the plain decoded output.
    keep_unchanged: float = 0.0


# ----------------------------------------------------------------------------- data / train


@dataclass
class DataConfig:
    """Which data set to train on and how images are prepared."""

    dataset: Literal["ipr2pr", "magicbrush", "gier", "evr", "ma5k", "jsonl", "shapes"] = "jsonl"
    path: str = ""
    split: str = "train"
    # A JSONL manifest of image-text pairs (e.g. the shapes world's caption split) mixed into the
    # training set at its share of the rows; they train the instruction CE only (no edit to learn).
    captions: str = ""
    crop_side: int = 512  # centre square resized to this before CLIP and diffusion (0 = keep its size)
    resolution: int = 256  # diffusion crop (paper: 256x256)
    max_instruction_tokens: int = 64
    max_expressive_tokens: int = 64
    num_workers: int = 2
    # Training-time rewording of the terse instructions (beyond the paper; 0 = as written, as the
    # paper trains): the share of rows whose instruction is their expressive text itself, and the
    # probability that each word of an instruction that its expressive text does not contain (the
    # wording, not the content) is dropped. See mgie.data.dataset.reword.
    explicit_instructions: float = 0.0
    wording_dropout: float = 0.0


@dataclass
class TrainConfig:
    """Optimisation recipe (paper: AdamW 5e-4, wd 0, cosine, 3% warm-up, global batch 32)."""

    output_dir: str = ""  # "" = runs/<config file name without .yaml>
    init_from: str = ""  # an MGIE checkpoint folder to start from ("" = random init from the config)
    init_vae: str = ""  # a diffusers AutoencoderKL folder (train/vae.py) for the model (also over init_from)
    # When init_from's UNet lacks the coordinate channels the config asks for, their conv_in weights
    # start as this multiple of a fresh conv_in's default draw (0: zero, init_from's function
    # exactly; mgie-shapes then moved them by 0.003 in 1,000 steps, 4% of a latent channel's).
    coord_init: float = 0.0
    # Start the edit-map head afresh even when init_from's fits (edit_head.map_grid). The short
    # recipe's map head, trained from the start beside a from-scratch MLLM, settled on a map that
    # ignores the text ("the top left corner": a quarter in each corner); a fresh one trained on the
    # grown MLLM reads it (configs/shapes_fast_map.yaml).
    fresh_map_head: bool = False
    # Build the UNet from model.diffusion.unet with random weights instead of loading init_from's
    # (the MLLM, edit head and VAE still load): a UNet of another design trained on a grown MLLM.
    fresh_unet: bool = False
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 4  # per process
    grad_accum: int = 1
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 5e-4
    lr_lora: float = 0.0  # 0 = use lr
    lr_img_tokens: float = 0.0
    lr_mllm: float = 0.0  # the whole MLLM, when model.mllm.trainable=full
    lr_edit_head: float = 0.0
    lr_unet: float = 0.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    train_unet: bool = True  # false = freeze: [unet]
    # Parameter groups kept frozen (MGIEModel.trainable_groups): e.g. [lora, img_tokens, mllm,
    # edit_head, unet] trains only a new map head (edit_map) on a finished model.
    freeze: list[Literal["lora", "img_tokens", "mllm", "edit_head", "edit_map", "unet"]] = field(
        default_factory=list
    )
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    # Mixed precision for the forward pass (torch.autocast; the weights, gradients and AdamW state
    # stay float32). bfloat16 runs the matmuls and convolutions in bf16 on CPUs with AVX512-BF16/AMX
    # and on GPUs; "none" is plain float32.
    autocast: Literal["none", "bfloat16"] = "none"


@dataclass
class MGIEConfig:
    """The root of the configuration tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed config (batch sizes derived)


# ----------------------------------------------------------------------------- (de)serialisation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            if arm is not type(None):
                try:
                    return _coerce(value, arm, key)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` strictly: every key must be a field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown config key(s) {unknown} at {where}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)  # fields not given keep their defaults


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts and lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def merge_dicts(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "deepspeed":
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """Turn ``"a.b.c=value"`` into ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.problem})") from None
    for k in reversed(keys):
        value = {k: value}
    return value


def from_dict(data: dict) -> MGIEConfig:
    """Build an :class:`MGIEConfig` from a nested dict on top of the defaults, strictly."""
    base = to_dict(MGIEConfig())
    return _from_dict(MGIEConfig, merge_dicts(base, data))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict, with its ``base: other.yaml`` chain (relative paths) merged under it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return merge_dicts(_read_yaml(path.parent / str(base), (*seen, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MGIEConfig:
    """Load a YAML config and apply dotted overrides.

    A file may start from a code preset (``preset: NAME``) and/or another file (``base: FILE``,
    relative to it); its own keys override those, and ``overrides`` override everything.
    """
    from mgie.presets import get_preset  # local import: presets build on this module

    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides or []:
        data = merge_dicts(data, parse_override(text))
    preset = data.pop("preset", None)
    base = to_dict(get_preset(preset)) if preset is not None else to_dict(MGIEConfig())
    cfg = _from_dict(MGIEConfig, merge_dicts(base, data))
    validate(cfg)
    return cfg


def validate(cfg: MGIEConfig) -> None:
    """Value checks that types alone cannot express."""
    m = cfg.model
    if not 0 <= cfg.inference.keep_unchanged <= 1:
        raise ConfigError(f"inference.keep_unchanged must be in [0, 1], got {cfg.inference.keep_unchanged}")
    if m.mllm.num_img_tokens < 1:
        raise ConfigError("model.mllm.num_img_tokens must be >= 1")
    if m.edit_head.hidden_size % m.edit_head.num_heads:
        raise ConfigError("model.edit_head.hidden_size must be divisible by model.edit_head.num_heads")
    drops = (m.loss.drop_text, m.loss.drop_both, m.loss.drop_image)
    if m.loss.change_weight < 0:
        raise ConfigError(f"model.loss.change_weight must be >= 0, got {m.loss.change_weight}")
    if min(drops) < 0 or sum(drops) > 1:
        raise ConfigError(f"model.loss drop probabilities must be >= 0 and sum to <= 1, got {drops}")
    if m.mllm.vision.image_size % m.mllm.vision.patch_size:
        raise ConfigError("model.mllm.vision.image_size must be a multiple of patch_size")
    unet = m.diffusion.unet
    if unet.coord_channels not in (0, 2):
        raise ConfigError(f"model.diffusion.unet.coord_channels must be 0 or 2, got {unet.coord_channels}")
    if unet.map_channels not in (0, 1):
        raise ConfigError(f"model.diffusion.unet.map_channels must be 0 or 1, got {unet.map_channels}")
    if m.edit_head.map_grid < 0:
        raise ConfigError(f"model.edit_head.map_grid must be >= 0, got {m.edit_head.map_grid}")
    if cfg.train.fresh_unet and not cfg.train.init_from:
        raise ConfigError("train.fresh_unet needs train.init_from (without it every weight is fresh)")
    if cfg.train.fresh_map_head and not (cfg.train.init_from and m.edit_head.map_grid):
        raise ConfigError("train.fresh_map_head needs train.init_from and model.edit_head.map_grid > 0")
    for key in ("map_image", "map_cells"):
        if getattr(m.edit_head, key) and not (m.edit_head.map_grid and m.mllm.use_image):
            raise ConfigError(
                f"model.edit_head.{key} needs model.edit_head.map_grid > 0 and model.mllm.use_image"
            )
    if bool(unet.map_channels) != bool(m.edit_head.map_grid):
        raise ConfigError(
            "model.diffusion.unet.map_channels: 1 and model.edit_head.map_grid > 0 go together "
            f"(got {unet.map_channels} and {m.edit_head.map_grid})"
        )
    if m.loss.patch_weight < 0 or (m.loss.patch_weight and not m.mllm.use_image):
        raise ConfigError(
            f"model.loss.patch_weight must be >= 0, and > 0 only with model.mllm.use_image (got {m.loss.patch_weight})"
        )
    if m.loss.map_weight < 0 or not 0 <= m.loss.map_teacher <= 1:
        raise ConfigError(
            f"model.loss.map_weight must be >= 0 and map_teacher in [0, 1], got {m.loss.map_weight}, "
            f"{m.loss.map_teacher}"
        )
    if unet.in_channels != 2 * m.diffusion.vae.latent_channels + unet.coord_channels + unet.map_channels:
        raise ConfigError(
            "model.diffusion.unet.in_channels must be 2 x vae.latent_channels + coord_channels + map_channels"
            " (IP2P layout)"
        )
    if cfg.train.coord_init < 0:
        raise ConfigError(f"train.coord_init must be >= 0, got {cfg.train.coord_init}")
    for key in ("explicit_instructions", "wording_dropout"):
        if not 0 <= getattr(cfg.data, key) <= 1:
            raise ConfigError(f"data.{key} must be in [0, 1], got {getattr(cfg.data, key)}")
    noise = m.diffusion.noise
    if noise.rescale_betas_zero_snr and noise.prediction_type == "epsilon":
        raise ConfigError(
            "model.diffusion.noise.rescale_betas_zero_snr needs prediction_type sample or v_prediction"
        )


def save_config(cfg: MGIEConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
