"""The multimodal LLM: transformers' ``LlavaForConditionalGeneration`` plus MGIE's tokens and adapters.

The backbone is the stock transformers class, so llava-hf folders load as they are. MGIE's
LLaVA-v1 single linear projector is expressed inside that class exactly: ``linear_1`` carries
the weights, the activation is the identity and ``linear_2`` is a frozen identity matrix (an
fp32 matmul with the identity is exact). The ``<im_patch>`` token is Llava's image token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mgie.config import LoRAConfig, MLLMConfig, QuantizationConfig
from mgie.tokens import TokenIds, mgie_token_names


def num_patches(cfg: MLLMConfig) -> int:
    """Image tokens per image: (image_size / patch_size)^2 (CLS dropped)."""
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2


def prompt_image_tokens(cfg: MLLMConfig) -> int:
    """Image tokens in the prompt: ``num_patches``, or 0 when the LLM does not see the image (LGIE)."""
    return num_patches(cfg) if cfg.use_image else 0


def default_token_ids(cfg: MLLMConfig) -> TokenIds:
    """Ids of the MGIE tokens appended to a LLaMA-layout vocabulary (unk 0, bos 1, eos 2)."""
    base = cfg.text.vocab_size
    n = cfg.num_img_tokens
    return TokenIds(
        bos=1,
        eos=2,
        pad=0,
        im_patch=base,
        im_start=base + 1,
        im_end=base + 2,
        img=tuple(range(base + 3, base + 3 + n)),
    )


def llava_config(cfg: MLLMConfig) -> LlavaConfig:
    """The transformers ``LlavaConfig`` for ``cfg``; the vocabulary includes the MGIE tokens."""
    v, t = cfg.vision, cfg.text
    vocab = t.vocab_size + len(mgie_token_names(cfg.num_img_tokens))
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        vocab_size=vocab,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=t.vocab_size,
        image_seq_length=num_patches(cfg),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="linear" if cfg.projector == "linear" else "gelu",
    )


def _identity_projector_tail(model: LlavaForConditionalGeneration) -> None:
    """Make ``linear_2`` the identity so the projector is LLaVA-v1's single Linear."""
    lin = model.model.multi_modal_projector.linear_2
    if lin.weight.is_meta:
        return
    with torch.no_grad():
        lin.weight.copy_(torch.eye(lin.weight.shape[0], dtype=lin.weight.dtype))
        lin.bias.zero_()


def build_mllm(cfg: MLLMConfig) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA for ``cfg`` (use a ``torch.device`` context for meta/cuda)."""
    config = llava_config(cfg)
    config._attn_implementation = cfg.attn_implementation
    model = LlavaForConditionalGeneration(config)
    if cfg.projector == "linear":
        _identity_projector_tail(model)
    return model


def quantization_config(q: QuantizationConfig):
    """``BitsAndBytesConfig`` for ``q`` (None when ``bits == 0``); the vision side stays unquantised."""
    if q.bits == 0:
        return None
    from transformers import BitsAndBytesConfig

    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]  # matched from the start
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def load_mllm(
    path: str | Path, cfg: MLLMConfig, dtype: torch.dtype, quant: QuantizationConfig | None = None
) -> LlavaForConditionalGeneration:
    """Load a llava-hf style folder with *our* config; any missing or unexpected key is an error."""
    config = llava_config(cfg)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(path),
            config=config,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            quantization_config=quantization_config(quant) if quant else None,
            output_loading_info=True,
        )
    except (OSError, RuntimeError) as e:  # transformers raises RuntimeError on shape mismatches
        raise ValueError(
            f"{path}: checkpoint does not match the model config ({str(e).splitlines()[0]})"
        ) from None
    bad = {
        k: sorted(v)
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if bad:
        raise ValueError(f"{path}: checkpoint does not match the model config: {bad}")
    return model


def freeze(module: nn.Module) -> nn.Module:
    """Freeze every parameter of ``module`` (returned for chaining)."""
    return module.requires_grad_(False)


def make_trainable(model: LlavaForConditionalGeneration, cfg: MLLMConfig, lora: LoRAConfig, ids: TokenIds):
    """What trains in the MLLM: adapters (LoRA + [IMG] rows, the paper-scale default) or, for a
    model trained from scratch, every weight (a linear projector's identity tail stays frozen)."""
    if cfg.trainable == "adapters":
        return apply_adapters(model, lora, ids)
    model.requires_grad_(True)
    if cfg.projector == "linear":
        model.model.multi_modal_projector.linear_2.requires_grad_(False)
    return model


def apply_adapters(model: LlavaForConditionalGeneration, lora: LoRAConfig, ids: TokenIds):
    """Freeze the LLaVA, then make trainable: LoRA on the language model (if enabled) and the
    ``[IMG]`` rows of the input embeddings and the LM head (peft trainable tokens)."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    freeze(model)
    img = list(ids.img)
    if lora.enabled:
        targets = "|".join(lora.target_modules)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=rf".*language_model.*\.({targets})",
            trainable_token_indices={"embed_tokens": img, "lm_head": img},
        )
    else:
        config = TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=img)
    return get_peft_model(model, config)


def _peft_layers():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    return LoraLayer, TrainableTokensLayer


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain LLaVA state dict under a peft-wrapped model, adapters *not* applied."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        _strip(k): v.detach().clone()
        for k, v in base.state_dict().items()
        if "lora_" not in k and "trainable_tokens_" not in k
    }


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain LLaVA state dict of a (possibly peft-wrapped) model, adapters merged in.

    Computed without touching the live model: LoRA deltas are added and trainable [IMG] rows
    written into copies of the base weights.
    """
    out = base_state_dict(model)
    if not hasattr(model, "get_base_model"):
        return out
    lora_layer, tokens_layer = _peft_layers()
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, lora_layer):
            w = out[f"{_strip(name)}.weight"]
            for adapter in module.active_adapters:
                w += module.get_delta_weight(adapter).to(w.dtype)
        elif isinstance(module, tokens_layer):
            merged = module.get_merged_weights(module.active_adapters)
            out[f"{_strip(name)}.weight"] = merged.detach().clone()
    return out


def _strip(key: str) -> str:
    """Remove peft's wrapper levels from a parameter name."""
    for part in (".base_layer", ".token_adapter", ".original_module"):
        key = key.replace(part, "")
    return key
