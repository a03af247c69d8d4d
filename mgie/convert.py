"""``python -m mgie.convert``: foreign checkpoints -> an MGIE folder (``MGIEModel.from_pretrained``).

Subcommands
-----------
``official``
    Apple's MGIE release (``mllm.pt``, ``unet.pt``) + the merged LLaVA-7B-v1 folder + a CLIP
    ViT-L/14 folder (the vision tower is not in the LLaVA checkpoint: the official code keeps it
    in a Python list, the "FSDP hack") + an SD-1.5 / InstructPix2Pix VAE folder. Token ids stay
    32000..32010. The result reproduces the official inference computation.
``llava-v1``
    LLaVA-7B-v1 + CLIP ViT-L/14 + an SD-1.5 UNet (4 channels, widened with
    :func:`mgie.diffusion.widen_conv_in`, as the paper's training starts) or an InstructPix2Pix
    UNet (8 channels, as is) + a VAE -> an *untrained* MGIE-7B of exactly the ``mgie-7b`` preset
    (the ``train.init_from`` of ``configs/pretrain_ipr2pr.yaml``): 8 [IMG] rows appended to the
    embeddings and the LM head, each the mean of the existing rows, and a fresh edit head.
``llava-hf``
    A llava-hf LLaVA(-1.5) folder + an InstructPix2Pix or SD-1.5 UNet + a VAE -> an *untrained*
    MGIE starting point: MGIE tokens appended after the source vocabulary (32064.. for
    LLaVA-1.5), their embedding and LM-head rows set to the mean of the existing rows (what
    transformers' ``resize_token_embeddings`` does), and a fresh edit head.

How it works (and why it never holds more than about one copy of the model)
---------------------------------------------------------------------------
1. **Open lazily.** Every weight file is opened without reading its data: safetensors through
   ``safe_open``, ``.pt``/``.bin`` through ``torch.load(weights_only=True, mmap=True,
   map_location="cpu")`` (a legacy non-zip pickle falls back to a plain load of that one file).
   This gives ``key -> shape`` for every source.
2. **Derive the config** from the sources' own configs and tensor shapes (``official_config``,
   ``llava_v1_config``, ``llava_hf_config``) on top of the ``mgie-7b`` preset; ``--set a.b=c``
   overrides win. What no shape can tell (the edit head's head count, official value 4; the
   UNet's attention head size when no UNet config is given) comes from the preset.
3. **Map keys with a pure function of ``key -> shape`` dicts** (``official_plan``,
   ``llava_v1_plan``, ``llava_hf_plan``). It returns, for every tensor of our folder, an
   :class:`Op` saying how to compute it from source tensors (take as is, reshape, identity,
   zeros, append mean rows, widen ``conv_in``...) together with its shape. Every consumed source
   key is popped; source keys left over (outside the documented ignore groups, ``IGNORED``) or
   missing are an error that lists them, and the produced keys and shapes must equal those of the
   model built from the config on the meta device (``target_shapes``), exactly. Because it runs
   on shapes only, the tests run it on the full-size official key sets without any weights.
4. **Execute part by part.** The LLM part is written as safetensors shards of at most
   ``--max-shard-size`` (2 GB): each shard's tensors are materialised from the memory-mapped
   sources, written and released before the next shard, so the extra memory is about twice one
   shard (safetensors serialises a copy) plus, later and one at a time, the edit head, the UNet
   and the VAE. No torch module is ever built with real weights. Output goes to a hidden
   ``.NAME.partial`` folder beside ``--out`` that is renamed at the end; ``conversion.json``
   records the inputs, checked hashes, ignored key counts and decisions.

Documented ignore groups (never loaded by the official code either): LLaMA's
``rotary_emb.inv_freq`` buffers (recomputed from the config), CLIP's text tower, projections and
``logit_scale`` (only the vision tower is used), and ``position_ids`` buffers. LLaVA-v1's own
``embed_tokens``/``lm_head`` are read (shape-checked) but superseded by ``mllm.pt``'s trained
copies in the ``official`` route, exactly as the official ``load_state_dict(mllm.pt)`` does.

``emb`` versus ``embed_tokens``: the official inference feeds the LLM with the trained
``model.embed_tokens`` but gives the edit head ``E = mllm.pt['emb']``; training used
``embed_tokens.weight[-8:]`` for both. Our model has one table: ``E`` *is* the [IMG] rows of the
input embeddings. ``--img-embeddings auto`` (default) converts only when ``emb`` equals those rows
bit for bit (or is absent); if they differ the conversion stops, because no single table can
reproduce both uses (``E`` enters ``llm2hid(H + E)`` per token, which no bias can absorb). Then
``--img-embeddings embed_tokens`` keeps the LLM exact, ``--img-embeddings emb`` keeps ``E``
exact, each with a warning that states the size of the difference.

Bad input (missing folder or file, wrong file type, mismatched shapes, leftover or missing keys,
sha256 mismatch) gives one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mgie.cli import Parser, run_command
from mgie.config import merge_dicts
from mgie.utils import torch_dtype

Shape = tuple[int, ...]
Shapes = dict[str, Shape]

#: Source key groups that are dropped on purpose (group -> regexes), see the module docstring.
IGNORED: dict[str, tuple[str, ...]] = {
    "llava": (r"\.rotary_emb\.inv_freq$",),
    "llava-hf": (r"\.rotary_emb\.inv_freq$", r"(^|\.)position_ids$"),
    "clip": (
        r"^text_model\.",
        r"^text_projection\.",
        r"^visual_projection\.",
        r"^logit_scale$",
        r"(^|\.)position_ids$",
    ),
}

IMG_EMBEDDINGS = ("auto", "emb", "embed_tokens")
SAFETENSORS_META = {"format": "pt"}


class ConversionError(ValueError):
    """The sources cannot be converted (bad files, keys or shapes); the message says which."""


def _listing(items: Iterable, limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Op:
    """How one output tensor is computed: ``fn(*source tensors)`` (``fn=None``: the one source as is)."""

    shape: Shape
    srcs: tuple[tuple[str, str], ...] = ()
    fn: Callable[..., torch.Tensor] | None = None
    what: str = "copy"

    def materialize(self, get: Callable[[str, str], torch.Tensor]) -> torch.Tensor:
        """The output tensor, from the sources that ``get(group, key)`` reads; checks the planned shape."""
        tensors = [get(g, k) for g, k in self.srcs]
        out = tensors[0] if self.fn is None else self.fn(*tensors)
        if tuple(out.shape) != self.shape:  # an internal invariant: the plan promised this shape
            raise ConversionError(f"{self.what} of {self.srcs} gave {tuple(out.shape)}, planned {self.shape}")
        return out

    def source(self) -> str:
        """Where the tensor comes from, for the conversion report."""
        return ", ".join(f"{g}:{k}" for g, k in self.srcs) or self.what


def take(group: str, key: str, shape: Shape) -> Op:
    """Copy ``group:key`` as is."""
    return Op(tuple(shape), ((group, key),))


def reshaped(group: str, key: str, shape: Shape) -> Op:
    """``group:key`` reshaped to ``shape``."""
    return Op(tuple(shape), ((group, key),), lambda t: t.reshape(shape), "reshape")


def eye(n: int, like: tuple[str, str]) -> Op:
    """An (n, n) identity in the dtype of the tensor ``like``."""
    return Op((n, n), (like,), lambda t: torch.eye(n, dtype=t.dtype), "identity")


def zeros(shape: Shape, like: tuple[str, str]) -> Op:
    """Zeros of ``shape`` in the dtype of the tensor ``like``."""
    return Op(tuple(shape), (like,), lambda t: torch.zeros(shape, dtype=t.dtype), "zeros")


def mean_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (V, D) with ``n`` rows appended, each the mean of the existing rows (computed in fp32)."""
    mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(n, -1)], dim=0)


def append_mean(group: str, key: str, shape: Shape, n: int) -> Op:
    """``group:key`` (V, D) with ``n`` mean rows appended (new token embeddings)."""
    rows, dim = shape
    return Op((rows + n, dim), ((group, key),), lambda t: mean_rows(t, n), f"append {n} mean rows")


def widen_conv_weight(weight: torch.Tensor, bias: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``conv_in.weight`` widened by :func:`mgie.diffusion.widen_conv_in` (new channels zero).

    The project's function is applied to the convolution alone (a stand-in object with just
    ``conv_in`` and ``register_to_config``), so no UNet has to be built with real weights.
    """
    from mgie.diffusion import widen_conv_in

    out_ch, in_ch, kh, kw = weight.shape
    conv = torch.nn.Conv2d(in_ch, out_ch, (kh, kw), padding=(kh // 2, kw // 2), dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    holder = types.SimpleNamespace(conv_in=conv, register_to_config=lambda **_: None)
    widen_conv_in(holder, in_channels)
    return holder.conv_in.weight.detach()


def widen(group: str, wkey: str, bkey: str, shape: Shape, in_channels: int) -> Op:
    """A ``conv_in`` weight (O, I, k, k) widened to ``in_channels`` inputs, new channels zero."""
    out_ch, _, kh, kw = shape
    return Op(
        (out_ch, in_channels, kh, kw),
        ((group, wkey), (group, bkey)),
        lambda w, b: widen_conv_weight(w, b, in_channels),
        f"widen to {in_channels} channels",
    )


def with_rows(group: str, key: str, shape: Shape, rows_from: tuple[str, str], start: int, n: int) -> Op:
    """``key`` with rows ``start..start+n-1`` replaced by the (n, D) tensor ``rows_from`` (any leading 1s)."""

    def fn(t, rows):
        out = t.clone()
        out[start : start + n] = rows.reshape(n, -1).to(t.dtype)
        return out

    return Op(tuple(shape), ((group, key), rows_from), fn, "replace [IMG] rows")


@dataclass
class Plan:
    """Output tensors by part (``mllm``, ``edit_head``, ``unet``, ``vae``), plus what was ignored."""

    parts: dict[str, dict[str, Op]]
    ignored: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def shapes(self) -> dict[str, Shapes]:
        """Planned output shapes by part."""
        return {p: {k: op.shape for k, op in ops.items()} for p, ops in self.parts.items()}


class _Pool:
    """The not-yet-consumed keys of one source group."""

    def __init__(self, group: str, shapes: Mapping[str, Shape]):
        self.group = group
        self.left: Shapes = {k: tuple(v) for k, v in shapes.items()}
        self.missing: list[str] = []
        self.ignored: list[str] = []

    def pop(self, key: str) -> Shape | None:
        """Consume ``key``; a key that is absent is recorded as missing."""
        if key not in self.left:
            self.missing.append(key)
            return None
        return self.left.pop(key)

    def pop_optional(self, key: str) -> Shape | None:
        """Consume ``key`` if present; absence is not an error."""
        return self.left.pop(key, None)

    def pop_matching(self, pattern: str) -> Shapes:
        """Consume every key that the regular expression ``pattern`` finds."""
        rx = re.compile(pattern)
        return {k: self.left.pop(k) for k in sorted(self.left) if rx.search(k)}

    def ignore(self, patterns: Iterable[str]) -> None:
        """Consume the keys that ``patterns`` match and record them as ignored."""
        for p in patterns:
            self.ignored += list(self.pop_matching(p))


def _finish(pools: Sequence[_Pool]) -> dict[str, list[str]]:
    """Raise on missing or left-over source keys; return the ignored keys by group."""
    missing = [f"{p.group}:{k}" for p in pools for k in p.missing]
    if missing:
        raise ConversionError(f"missing source keys: {_listing(missing)}")
    left = [f"{p.group}:{k}" for p in pools for k in sorted(p.left)]
    if left:
        raise ConversionError(
            f"unexpected source keys (not used by MGIE and not in a documented ignore group): {_listing(left)}"
        )
    return {p.group: p.ignored for p in pools if p.ignored}


def _rows(shape: Shape | None, what: str) -> int:
    if shape is None or len(shape) != 2:
        raise ConversionError(f"{what} must be a 2-D matrix, got shape {shape}")
    return shape[0]


# ----------------------------------------------------------------------------- expected shapes


def target_shapes(cfg) -> dict[str, Shapes]:
    """Keys and shapes of every tensor an MGIE folder for ``cfg`` holds (model built on meta)."""
    from mgie.model import MGIEModel

    with torch.device("meta"):
        model = MGIEModel.from_config(cfg, adapters=False)
    return {
        "mllm": {k: tuple(v.shape) for k, v in model.mllm.state_dict().items()},
        "edit_head": {k: tuple(v.shape) for k, v in model.edit_head.state_dict().items()},
        "unet": {k: tuple(v.shape) for k, v in model.unet.state_dict().items()},
        "vae": {k: tuple(v.shape) for k, v in model.vae.state_dict().items()},
    }


def check_plan(plan: Plan, expected: Mapping[str, Shapes]) -> None:
    """The plan must produce exactly the expected keys with the expected shapes."""
    problems = []
    for part, want in expected.items():
        got = plan.parts.get(part, {})
        extra = [f"{got[k].source()} (-> {part}:{k})" for k in got if k not in want]
        if extra:
            problems.append(f"unexpected source keys (no place in the MGIE model): {_listing(extra)}")
        lacking = [f"{part}:{k}" for k in want if k not in got]
        if lacking:
            problems.append(f"missing source keys for the MGIE tensors: {_listing(lacking)}")
        bad = [
            f"{got[k].source()} gives {got[k].shape} but {part}:{k} needs {want[k]}"
            for k in want
            if k in got and got[k].shape != tuple(want[k])
        ]
        if bad:
            problems.append(f"shape mismatch: {_listing(bad, 10)}")
    if problems:
        raise ConversionError("; ".join(problems))


# ----------------------------------------------------------------------------- config derivation


def _finalize_config(data: dict, overrides: Sequence[str]):
    from mgie.config import from_dict, parse_override, validate

    for text in overrides:
        data = merge_dicts(data, parse_override(text))
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def _base_dict() -> dict:
    from mgie.config import to_dict
    from mgie.presets import mgie_7b

    return to_dict(mgie_7b())


def _vision_fields(v: Mapping) -> dict:
    if v.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ConversionError(f"CLIP vision hidden_act {v.get('hidden_act')!r} is not supported (quick_gelu)")
    if v.get("num_channels", 3) != 3:
        raise ConversionError("CLIP vision tower must take 3-channel images")
    return {
        "hidden_size": v["hidden_size"],
        "intermediate_size": v["intermediate_size"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_attention_heads": v["num_attention_heads"],
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "layer_norm_eps": float(v.get("layer_norm_eps", 1e-5)),
    }


def _unet_fields(d: Mapping, in_channels: int | None = None) -> dict:
    head_dim = d.get("attention_head_dim", 8)
    if isinstance(head_dim, list):
        if len(set(head_dim)) != 1:
            raise ConversionError(f"UNet attention_head_dim {head_dim} (per block) is not supported")
        head_dim = head_dim[0]
    keys = ("out_channels", "sample_size", "layers_per_block", "cross_attention_dim", "norm_num_groups")
    out = {k: d[k] for k in keys if k in d}
    out.update(
        in_channels=in_channels if in_channels is not None else d.get("in_channels", 4),
        attention_head_dim=head_dim,
    )
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        if k in d:
            out[k] = list(d[k])
    return out


def _vae_fields(d: Mapping) -> dict:
    keys = ("layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor")
    out = {k: d[k] for k in keys if k in d}
    if "block_out_channels" in d:
        out["block_out_channels"] = list(d["block_out_channels"])
    if "scaling_factor" in out:
        out["scaling_factor"] = float(out["scaling_factor"])
    if "mid_block_add_attention" in d and "mid_block_attention" in _field_names("VAEConfig"):
        out["mid_block_attention"] = bool(d["mid_block_add_attention"])
    return out


def _field_names(cls_name: str) -> set[str]:
    import dataclasses

    import mgie.config

    return {f.name for f in dataclasses.fields(getattr(mgie.config, cls_name))}


def _norm(value):
    return json.loads(json.dumps(value))


def check_diffusers_config(kind: str, built: Mapping, source: Mapping, skip: Iterable[str] = ()) -> None:
    """Every architecture setting the source config states must equal the one we build with."""
    skip = set(skip)
    diff = [
        f"{k}={_norm(source[k])!r} (ours {_norm(built[k])!r})"
        for k in source
        if not k.startswith("_") and k in built and k not in skip and _norm(source[k]) != _norm(built[k])
    ]
    if diff:
        raise ConversionError(f"{kind} config differs from what MGIE can build: {_listing(diff)}")


def _diffusers_checks(cfg, unet_json: Mapping | None, vae_json: Mapping | None, widened: bool) -> None:
    from mgie.diffusion import build_unet, build_vae

    with torch.device("meta"):
        if unet_json is not None:
            unet = build_unet(cfg.model.diffusion.unet)
            check_diffusers_config("UNet", unet.config, unet_json, skip=("in_channels",) if widened else ())
        if vae_json is not None:
            vae = build_vae(cfg.model.diffusion.vae)
            check_diffusers_config("VAE", vae.config, vae_json)


def _edit_head_fields(shapes: Shapes, prefix: str, llm_hidden: int) -> dict:
    need = [
        f"{prefix}llm2hid.weight",
        f"{prefix}query",
        f"{prefix}hid2feat.weight",
        f"{prefix}mapper.encoder.layers.0.linear1.weight",
    ]
    lacking = [k for k in need if k not in shapes]
    if lacking:
        raise ConversionError(f"edit head keys missing from mllm.pt: {_listing(lacking)}")
    hidden, d_in = shapes[f"{prefix}llm2hid.weight"]
    if d_in != llm_hidden:
        raise ConversionError(f"edit head takes {d_in}-d states but the LLM hidden size is {llm_hidden}")

    def count(side):
        rx = re.compile(rf"^{re.escape(prefix)}mapper\.{side}\.layers\.(\d+)\.")
        return len({m.group(1) for k in shapes if (m := rx.match(k))})

    return {
        "hidden_size": hidden,
        "num_queries": shapes[f"{prefix}query"][1],
        "ff_size": shapes[f"{prefix}mapper.encoder.layers.0.linear1.weight"][0],
        "num_encoder_layers": count("encoder"),
        "num_decoder_layers": count("decoder"),
    }


def _llava_v1_mllm(llava: Mapping, vision: Mapping, llava_shapes: Shapes) -> dict:
    """The ``model.mllm`` fields of a merged LLaVA-v1 folder (config.json + key shapes) + CLIP."""
    if "text_config" in llava or "mm_hidden_size" not in llava:
        raise ConversionError(
            "the LLaVA folder's config.json is not a LLaVA-v1 (LlavaLlamaForCausalLM) config "
            "(no mm_hidden_size); for llava-hf folders use `python -m mgie.convert llava-hf`"
        )
    if not llava.get("mm_use_im_start_end", False):
        raise ConversionError(
            "LLaVA config has mm_use_im_start_end false; MGIE's prompt needs <im_start>/<im_end>"
        )
    if llava.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"LLaVA hidden_act {llava.get('hidden_act')!r} is not supported (silu)")
    if llava.get("rope_scaling"):
        raise ConversionError("LLaVA config uses rope_scaling, which MGIE's config cannot express")
    vis = _vision_fields(vision)
    if llava["mm_hidden_size"] != vis["hidden_size"]:
        raise ConversionError(
            f"LLaVA mm_hidden_size {llava['mm_hidden_size']} != CLIP hidden_size {vis['hidden_size']}"
        )
    vocab_llava = int(llava["vocab_size"])
    emb_rows = _rows(llava_shapes.get("model.embed_tokens.weight"), "LLaVA model.embed_tokens.weight")
    if emb_rows != vocab_llava:
        raise ConversionError(f"LLaVA config vocab_size {vocab_llava} != embed_tokens rows {emb_rows}")
    heads = int(llava["num_attention_heads"])
    text = {
        "hidden_size": int(llava["hidden_size"]),
        "intermediate_size": int(llava["intermediate_size"]),
        "num_hidden_layers": int(llava["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(llava.get("num_key_value_heads") or heads),
        "max_position_embeddings": int(
            llava.get("max_position_embeddings") or llava.get("max_sequence_length") or 2048
        ),
        "rms_norm_eps": float(llava.get("rms_norm_eps", 1e-6)),
        "vocab_size": vocab_llava - 3,  # <im_patch> <im_start> <im_end> follow the base vocabulary
    }
    return {
        "vision": vis,
        "text": text,
        "vision_feature_layer": int(llava.get("mm_vision_select_layer", -2)),
        "projector": "linear",
    }


def official_config(
    llava: Mapping,
    vision: Mapping,
    shapes: Mapping[str, Shapes],
    unet: Mapping | None = None,
    vae: Mapping | None = None,
    overrides: Sequence[str] = (),
):
    """The :class:`MGIEConfig` of an official conversion, from the sources' configs and shapes.

    ``llava``: the LLaVA-7B-v1 ``config.json``; ``vision``: the CLIP vision config as a dict;
    ``shapes``: ``{"mllm.pt": ..., "llava": ...}`` key -> shape; ``unet``/``vae``: diffusers
    ``config.json`` dicts (``unet`` None: the SD-1.5 architecture with 8 input channels).
    """
    mllm = _llava_v1_mllm(llava, vision, shapes["llava"])
    vocab_llava = mllm["text"]["vocab_size"] + 3
    mllm_rows = _rows(shapes["mllm.pt"].get("model.embed_tokens.weight"), "mllm.pt model.embed_tokens.weight")
    mllm["num_img_tokens"] = mllm_rows - vocab_llava
    if mllm["num_img_tokens"] < 1:
        raise ConversionError(
            f"mllm.pt embed_tokens has {mllm_rows} rows, not more than LLaVA's {vocab_llava}: no [IMG] rows"
        )
    data = _base_dict()
    m = data["model"]
    m["mllm"] = merge_dicts(m["mllm"], mllm)
    m["edit_head"].update(_edit_head_fields(shapes["mllm.pt"], "edit_head.", mllm["text"]["hidden_size"]))
    if unet is not None:
        m["diffusion"]["unet"].update(_unet_fields(unet))
    if vae is not None:
        m["diffusion"]["vae"].update(_vae_fields(vae))
    cfg = _finalize_config(data, overrides)
    _diffusers_checks(cfg, unet, vae, widened=False)
    return cfg


def llava_v1_config(
    llava: Mapping,
    vision: Mapping,
    shapes: Mapping[str, Shapes],
    unet: Mapping,
    vae: Mapping,
    overrides: Sequence[str] = (),
):
    """The :class:`MGIEConfig` of an untrained MGIE on LLaVA-v1 (``shapes``: ``{"llava": ...}``);
    the [IMG] count and the edit head come from the ``mgie-7b`` preset and ``overrides``."""
    data = _base_dict()
    m = data["model"]
    m["mllm"] = merge_dicts(m["mllm"], _llava_v1_mllm(llava, vision, shapes["llava"]))
    m["diffusion"]["unet"].update(_unet_fields(unet, in_channels=2 * int(vae.get("latent_channels", 4))))
    m["diffusion"]["vae"].update(_vae_fields(vae))
    cfg = _finalize_config(data, overrides)
    widened = int(unet.get("in_channels", 4)) != cfg.model.diffusion.unet.in_channels
    _diffusers_checks(cfg, unet, vae, widened=widened)
    return cfg


def llava_hf_config(
    llava,
    unet: Mapping,
    vae: Mapping,
    overrides: Sequence[str] = (),
):
    """The :class:`MGIEConfig` of a llava-hf conversion; ``llava`` is the source ``LlavaConfig``."""
    from mgie.mllm import llava_config

    if llava.vision_feature_select_strategy != "default":
        raise ConversionError(
            f"vision_feature_select_strategy {llava.vision_feature_select_strategy!r} is not supported (default)"
        )
    if not isinstance(llava.vision_feature_layer, int):
        raise ConversionError(f"vision_feature_layer {llava.vision_feature_layer!r} must be one layer")
    if llava.projector_hidden_act != "gelu" or not getattr(llava, "multimodal_projector_bias", True):
        raise ConversionError("only the LLaVA-1.5 projector (Linear-GELU-Linear with biases) is supported")
    if getattr(llava.vision_config, "model_type", "") != "clip_vision_model":
        raise ConversionError(f"vision tower {llava.vision_config.model_type!r} is not CLIP")
    if getattr(llava.text_config, "model_type", "") != "llama":
        raise ConversionError(f"language model {llava.text_config.model_type!r} is not Llama")
    t = llava.text_config
    text = {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads or t.num_attention_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": float(t.rms_norm_eps),
        "vocab_size": t.vocab_size,
    }
    data = _base_dict()
    m = data["model"]
    m["mllm"] = merge_dicts(
        m["mllm"],
        {
            "vision": _vision_fields(llava.vision_config.to_dict()),
            "text": text,
            "vision_feature_layer": llava.vision_feature_layer,
            "projector": "mlp2x_gelu",
        },
    )
    m["diffusion"]["unet"].update(_unet_fields(unet, in_channels=2 * int(vae.get("latent_channels", 4))))
    m["diffusion"]["vae"].update(_vae_fields(vae))
    cfg = _finalize_config(data, overrides)
    ours = llava_config(cfg.model.mllm)
    fields = {
        "text": (
            "hidden_act",
            "attention_bias",
            "mlp_bias",
            "head_dim",
            "rope_parameters",
            "tie_word_embeddings",
        ),
        "vision": ("hidden_act", "layer_norm_eps", "num_channels"),
    }
    diff = []
    for side, names in fields.items():
        a, b = getattr(llava, f"{side}_config"), getattr(ours, f"{side}_config")
        for n in names:
            if hasattr(a, n) and _norm(getattr(a, n)) != _norm(getattr(b, n, None)):
                diff.append(f"{side}.{n}={getattr(a, n)!r} (ours {getattr(b, n, None)!r})")
    if diff:
        raise ConversionError(f"llava-hf config differs from what MGIE builds: {_listing(diff)}")
    _diffusers_checks(
        cfg, unet, vae, widened=int(unet.get("in_channels", 4)) != cfg.model.diffusion.unet.in_channels
    )
    return cfg


# ----------------------------------------------------------------------------- key mapping (pure)

_VAE_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CLIP_BARE = re.compile(r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.")


def _vae_key(key: str) -> str:
    """Old diffusers attention names in the VAE mid block -> current ones."""
    return re.sub(
        r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
        lambda m: m.group(1) + _VAE_OLD_ATTN[m.group(2)] + ".",
        key,
    )


def _map_diffusers(pool: _Pool, rename: Callable[[str], str] = lambda k: k) -> dict[str, Op]:
    return {rename(k): take(pool.group, k, s) for k, s in pool.pop_matching(r".").items()}


def _map_clip(pool: _Pool, prefix: str) -> dict[str, Op]:
    """CLIP vision keys (``vision_model.*`` of CLIPModel / old CLIPVisionModel, or the bare names
    transformers 5 writes for CLIPVisionModel) -> ``prefix`` + name."""
    pool.ignore(IGNORED["clip"])
    out = {}
    for k, s in pool.pop_matching(r"^vision_model\.").items():
        out[prefix + k[len("vision_model.") :]] = take(pool.group, k, s)
    for k, s in pool.pop_matching(_CLIP_BARE.pattern).items():
        out[prefix + k] = take(pool.group, k, s)
    return out


def _map_llava_v1(llava: _Pool, clip: _Pool) -> tuple[dict[str, Op], Shape | None, Shape | None]:
    """LLaMA blocks, final norm and projector of a LLaVA-v1 checkpoint, the CLIP vision tower.

    LLaVA-v1's single Linear projector becomes ``linear_1``; ``linear_2`` is the identity with a
    zero bias (see :mod:`mgie.mllm`). Returns the ops and the shapes of LLaVA's (popped)
    ``embed_tokens`` and ``lm_head``, which the caller maps.
    """
    lm: dict[str, Op] = {}
    llava.ignore(IGNORED["llava"])
    for k, s in llava.pop_matching(r"^model\.layers\.").items():
        lm["model.language_model." + k[len("model.") :]] = take("llava", k, s)
    if (s := llava.pop("model.norm.weight")) is not None:
        lm["model.language_model.norm.weight"] = take("llava", "model.norm.weight", s)
    lm.update(_map_clip(clip, "model.vision_tower."))
    w = llava.pop("model.mm_projector.weight")
    b = llava.pop("model.mm_projector.bias")
    if w is not None and b is not None:
        lm["model.multi_modal_projector.linear_1.weight"] = take("llava", "model.mm_projector.weight", w)
        lm["model.multi_modal_projector.linear_1.bias"] = take("llava", "model.mm_projector.bias", b)
        like = ("llava", "model.mm_projector.weight")
        lm["model.multi_modal_projector.linear_2.weight"] = eye(w[0], like)
        lm["model.multi_modal_projector.linear_2.bias"] = zeros((w[0],), like)
    return lm, llava.pop("model.embed_tokens.weight"), llava.pop("lm_head.weight")


def _map_unet(pool: _Pool, in_channels: int, notes: list[str]) -> dict[str, Op]:
    """A diffusers UNet as is, or with ``conv_in`` widened to ``in_channels`` (SD -> IP2P layout)."""
    ops = _map_diffusers(pool)
    conv = ops.get("conv_in.weight")
    if conv is not None and len(conv.shape) == 4 and conv.shape[1] != in_channels and "conv_in.bias" in ops:
        if conv.shape[1] > in_channels:
            raise ConversionError(f"UNet conv_in has {conv.shape[1]} input channels, more than {in_channels}")
        ops["conv_in.weight"] = widen(pool.group, "conv_in.weight", "conv_in.bias", conv.shape, in_channels)
        notes.append(f"UNet conv_in widened {conv.shape[1]} -> {in_channels} channels (new channels zero)")
    return ops


def _fresh_edit_head(expected: Mapping[str, Shapes]) -> dict[str, Op]:
    return {k: Op(s, (), None, "fresh edit head") for k, s in expected["edit_head"].items()}


def official_plan(shapes: Mapping[str, Shapes], cfg, img_embeddings: str = "auto") -> Plan:
    """Map the official sources (key -> shape per group) onto our folder; a pure function of shapes.

    Groups: ``mllm.pt``, ``unet.pt``, ``llava`` (LLaVA-7B-v1 weights), ``clip``, ``vae``.
    """
    if img_embeddings not in IMG_EMBEDDINGS:
        raise ConversionError(f"img_embeddings must be one of {IMG_EMBEDDINGS}, got {img_embeddings!r}")
    mllm, unet, llava, clip, vae = (
        _Pool(g, shapes[g]) for g in ("mllm.pt", "unet.pt", "llava", "clip", "vae")
    )
    m = cfg.model.mllm
    base, n_img, hidden = m.text.vocab_size, m.num_img_tokens, m.text.hidden_size
    lm, llava_embed, llava_head = _map_llava_v1(llava, clip)
    for k, s in (("model.embed_tokens.weight", llava_embed), ("lm_head.weight", llava_head)):
        if s is not None and _rows(s, f"llava:{k}") != base + 3:
            raise ConversionError(f"llava:{k} has {s[0]} rows; expected {base + 3} (base vocabulary + 3)")

    # Embeddings and LM head: mllm.pt's trained full matrices supersede LLaVA's.
    notes = ["LLaVA's embed_tokens/lm_head are superseded by mllm.pt's trained copies (as in demo.ipynb)"]
    embed = mllm.pop("model.embed_tokens.weight")
    head = mllm.pop("lm_head.weight")
    emb = mllm.pop_optional("emb")
    if embed is not None:
        lm["model.language_model.embed_tokens.weight"] = take("mllm.pt", "model.embed_tokens.weight", embed)
    if head is not None:
        lm["lm_head.weight"] = take("mllm.pt", "lm_head.weight", head)
    if emb is not None:
        if tuple(emb[-2:]) != (n_img, hidden) or any(d != 1 for d in emb[:-2]):
            raise ConversionError(
                f"mllm.pt:emb has shape {emb}; expected ({n_img}, {hidden}) or (1, {n_img}, {hidden})"
            )
        if img_embeddings == "emb" and embed is not None:
            lm["model.language_model.embed_tokens.weight"] = with_rows(
                "mllm.pt", "model.embed_tokens.weight", embed, ("mllm.pt", "emb"), base + 3, n_img
            )
            notes.append("[IMG] rows of embed_tokens replaced by mllm.pt:emb (--img-embeddings emb)")
    elif img_embeddings == "emb":
        raise ConversionError("--img-embeddings emb: mllm.pt has no 'emb'")
    else:
        notes.append("mllm.pt has no 'emb': E = the [IMG] rows of the trained embed_tokens (as in training)")

    head_ops = {
        k[len("edit_head.") :]: take("mllm.pt", k, s) for k, s in mllm.pop_matching(r"^edit_head\.").items()
    }
    parts = {
        "mllm": lm,
        "edit_head": head_ops,
        "unet": _map_diffusers(unet),
        "vae": _map_diffusers(vae, _vae_key),
    }
    ignored = _finish([mllm, unet, llava, clip, vae])
    plan = Plan(parts, ignored, notes)
    check_plan(plan, target_shapes(cfg))
    return plan


def llava_v1_plan(shapes: Mapping[str, Shapes], cfg) -> Plan:
    """An untrained MGIE on LLaVA-v1 (groups ``llava``, ``clip``, ``unet``, ``vae``): LLaVA's
    embeddings and LM head get ``num_img_tokens`` mean rows; the edit head is fresh."""
    llava, clip, unet, vae = (_Pool(g, shapes[g]) for g in ("llava", "clip", "unet", "vae"))
    m = cfg.model.mllm
    base, n_img = m.text.vocab_size, m.num_img_tokens
    lm, embed, head = _map_llava_v1(llava, clip)
    for name, k, s in (
        ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight", embed),
        ("lm_head.weight", "lm_head.weight", head),
    ):
        if s is not None:
            if _rows(s, f"llava:{k}") != base + 3:
                raise ConversionError(f"llava:{k} has {s[0]} rows; expected {base + 3} (base vocabulary + 3)")
            lm[name] = append_mean("llava", k, s, n_img)
    notes = [f"{n_img} new [IMG] rows (embeddings and LM head) = mean of the existing rows"]
    return _untrained_plan(cfg, lm, unet, vae, [llava, clip], notes)


def _untrained_plan(
    cfg, lm: dict[str, Op], unet: _Pool, vae: _Pool, sources: list[_Pool], notes: list[str]
) -> Plan:
    """The plan of an untrained starting point: mapped LLM, fresh edit head, UNet and VAE, checked."""
    expected = target_shapes(cfg)
    parts = {
        "mllm": lm,
        "edit_head": _fresh_edit_head(expected),
        "unet": _map_unet(unet, cfg.model.diffusion.unet.in_channels, notes),
        "vae": _map_diffusers(vae, _vae_key),
    }
    plan = Plan(parts, _finish([*sources, unet, vae]), notes)
    check_plan(plan, expected)
    return plan


def llava_hf_key(key: str) -> str:
    """Any llava-hf key style (hub <= 4.51, 4.52+, transformers 5 save) -> our state-dict name."""
    key = re.sub(r"^model\.(language_model|vision_tower|multi_modal_projector)\.", r"\1.", key)
    key = re.sub(r"^language_model\.model\.", "language_model.", key)
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
    key = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", key)
    return key if key.startswith("lm_head.") else "model." + key


def llava_hf_plan(shapes: Mapping[str, Shapes], cfg) -> Plan:
    """Map a llava-hf folder + UNet + VAE (groups ``llava-hf``, ``unet``, ``vae``) onto our folder."""
    src, unet, vae = (_Pool(g, shapes[g]) for g in ("llava-hf", "unet", "vae"))
    m = cfg.model.mllm
    n_new = 3 + m.num_img_tokens
    src.ignore(IGNORED["llava-hf"])
    lm = {}
    pattern = r"^(model\.)?(language_model|vision_tower|multi_modal_projector|lm_head)\."
    for k, s in src.pop_matching(pattern).items():
        name = llava_hf_key(k)
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if _rows(s, f"llava-hf:{k}") != m.text.vocab_size:
                raise ConversionError(
                    f"llava-hf:{k} has {s[0]} rows; text_config.vocab_size is {m.text.vocab_size}"
                )
            lm[name] = append_mean("llava-hf", k, s, n_new)
        else:
            lm[name] = take("llava-hf", k, s)
    notes = [f"{n_new} new token rows (embeddings and LM head) = mean of the existing rows"]
    return _untrained_plan(cfg, lm, unet, vae, [src], notes)


# ----------------------------------------------------------------------------- reading sources


class TensorSource:
    """The tensors of one source (one or more files), opened lazily: shapes without data."""

    def __init__(self, group: str, files: Sequence[Path]):
        from safetensors import safe_open

        self.group = group
        self.shapes: Shapes = {}
        self._where: dict[str, object] = {}
        for path in files:
            if not path.is_file():
                raise ConversionError(f"{group}: weight file not found: {path}")
            if path.suffix == ".safetensors":
                try:
                    handle = safe_open(str(path), framework="pt")
                    items = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
                except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                    raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
                store = handle
            else:
                store = _torch_load(path)
                items = {k: tuple(v.shape) for k, v in store.items()}
            dup = sorted(set(items) & set(self.shapes))
            if dup:
                raise ConversionError(f"{group}: keys found in more than one file: {_listing(dup)}")
            self.shapes.update(items)
            self._where.update(dict.fromkeys(items, store))

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``, from whichever file holds it."""
        store = self._where[key]
        return store[key] if isinstance(store, dict) else store.get_tensor(key)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.bin`` state dict: weights only, on the CPU, memory-mapped where the format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - unpickling raises many unrelated types
        raise ConversionError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


WEIGHT_NAMES = {
    "transformers": ("model.safetensors", "pytorch_model.bin"),
    "diffusers": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.bin",
    ),
}


def weight_files(folder: Path, kind: str) -> list[Path]:
    """The weight files of a HF/diffusers folder: a sharded index (its shards) or a single file;
    safetensors preferred."""
    for name in WEIGHT_NAMES[kind]:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConversionError(f"{index}: not a shard index ({e})") from None
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(
        f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES[kind])} and shard indexes)"
    )


def _folder(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{what} folder not found: {p}")
    return p


def _json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def component_dir(path: str | Path, sub: str, what: str) -> Path:
    """``path`` itself if it holds a ``config.json``, else its ``sub/`` folder (pipeline layout)."""
    p = _folder(path, what)
    if (p / "config.json").is_file():
        return p
    if (p / sub / "config.json").is_file():
        return p / sub
    raise ConversionError(f"{what} folder {p} has no config.json (nor {sub}/config.json)")


# ----------------------------------------------------------------------------- tokenizers


def llama_tokenizer(model_file: Path):
    """``LlamaTokenizer`` from a bare SentencePiece ``tokenizer.model`` (nothing else from its folder)."""
    from transformers import LlamaTokenizer

    if not model_file.is_file():
        raise ConversionError(f"missing {model_file} (the LLaMA SentencePiece model)")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        try:
            return LlamaTokenizer.from_pretrained(tmp)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{model_file}: not a SentencePiece model ({e})") from None


def official_tokenizer(llava_dir: Path, cfg):
    """The LLaMA tokenizer of the LLaVA folder + MGIE tokens; ids checked against the config."""
    from mgie.mllm import default_token_ids
    from mgie.tokens import IM_END, IM_PATCH, IM_START, add_mgie_tokens

    m = cfg.model.mllm
    tok = llama_tokenizer(llava_dir / "tokenizer.model")
    if len(tok) != m.text.vocab_size:
        raise ConversionError(
            f"{llava_dir / 'tokenizer.model'} has {len(tok)} pieces; the LLaVA vocabulary implies {m.text.vocab_size}"
        )
    added = llava_dir / "added_tokens.json"
    if added.is_file():
        got = _json(added)
        want = {IM_PATCH: m.text.vocab_size, IM_START: m.text.vocab_size + 1, IM_END: m.text.vocab_size + 2}
        if any(got.get(k) != v for k, v in want.items()):
            raise ConversionError(f"{added}: expected {want}, got {got}")
    return _check_tokenizer(tok, add_mgie_tokens(tok, m.num_img_tokens), default_token_ids(m))


def _check_tokenizer(tok, ids, want):
    got = (ids.im_patch, ids.im_start, ids.im_end, ids.img)
    exp = (want.im_patch, want.im_start, want.im_end, want.img)
    if got != exp:
        raise ConversionError(f"tokenizer gives MGIE token ids {got}, the model layout needs {exp}")
    return tok


def llava_hf_tokenizer(src_dir: Path, cfg):
    """The source's SentencePiece model, its added tokens (``<image>``, ``<pad>``) at their ids,
    fillers up to the (padded) text vocabulary, then the MGIE tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from mgie.mllm import default_token_ids
    from mgie.tokens import add_mgie_tokens

    m = cfg.model.mllm
    tok = llama_tokenizer(src_dir / "tokenizer.model")
    base = len(tok)
    try:
        src = AutoTokenizer.from_pretrained(str(src_dir))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{src_dir}: cannot load its tokenizer ({e})") from None
    extra = sorted((i, t) for t, i in src.get_added_vocab().items() if i >= base)
    if [i for i, _ in extra] != list(range(base, base + len(extra))):
        raise ConversionError(f"{src_dir}: added tokens {extra} are not contiguous from {base}")
    if base + len(extra) > m.text.vocab_size:
        raise ConversionError(
            f"{src_dir}: tokenizer has {base + len(extra)} tokens > vocab {m.text.vocab_size}"
        )
    for _, t in extra:
        tok.add_tokens([AddedToken(t, special=True, normalized=False)], special_tokens=True)
    fillers = [f"<mgie_unused_{i}>" for i in range(len(tok), m.text.vocab_size)]  # the padded rows
    if fillers:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in fillers], special_tokens=True)
    if src.pad_token is not None and src.pad_token in tok.get_vocab():
        tok.pad_token = src.pad_token
    if len(tok) != m.text.vocab_size:
        raise ConversionError(f"tokenizer has {len(tok)} tokens after padding, expected {m.text.vocab_size}")
    return _check_tokenizer(tok, add_mgie_tokens(tok, m.num_img_tokens), default_token_ids(m))


# ----------------------------------------------------------------------------- writing


def parse_size(text: str) -> int:
    """``"4GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * scale[unit])


class Writer:
    """Materialises a plan's tensors from the sources and writes them with safetensors."""

    def __init__(self, sources: Mapping[str, TensorSource], dtype: torch.dtype | None, log):
        self.sources, self.dtype, self.log = sources, dtype, log

    def get(self, group: str, key: str) -> torch.Tensor:
        """Tensor ``key`` of source ``group``."""
        return self.sources[group].get(key)

    def tensor(self, op: Op) -> torch.Tensor:
        """One output tensor, cast to the target dtype, in its own memory."""
        t = op.materialize(self.get)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.contiguous().clone()  # own memory: no views of mmap'd sources or shared storage

    def write_file(self, ops: Mapping[str, Op], path: Path) -> None:
        """Write ``ops`` as one safetensors file."""
        from safetensors.torch import save_file

        save_file({k: self.tensor(op) for k, op in ops.items()}, str(path), metadata=SAFETENSORS_META)

    def write_sharded(self, ops: Mapping[str, Op], folder: Path, max_bytes: int) -> int:
        """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, one shard in memory."""
        from safetensors.torch import save_file

        shards: list[list[str]] = []
        current: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush():
            nonlocal current, size
            if current:
                path = folder / f".shard-{len(shards):05d}.partial"
                save_file(current, str(path), metadata=SAFETENSORS_META)
                shards.append(list(current))
                self.log(f"  wrote LLM shard {len(shards)} ({size / 1e9:.2f} GB, {len(current)} tensors)")
                current, size = {}, 0

        for key, op in ops.items():
            t = self.tensor(op)
            n = t.numel() * t.element_size()
            if current and size + n > max_bytes:
                flush()
            current[key] = t
            size += n
            total += n
        flush()
        if len(shards) == 1:
            (folder / ".shard-00000.partial").rename(folder / "model.safetensors")
            return 1
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (folder / f".shard-{i:05d}.partial").rename(folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return len(shards)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh hidden staging folder beside ``out``; ``out`` must be new, empty or (with overwrite)
    an earlier MGIE folder."""
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise ConversionError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
            if not (out / "config.yaml").is_file():
                raise ConversionError(f"refusing to replace {out}: it does not look like an MGIE folder")
    if not out.parent.is_dir():
        raise ConversionError(f"output parent folder does not exist: {out.parent}")
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def _commit_out(stage: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)


def write_folder(
    plan: Plan,
    cfg,
    tokenizer,
    sources: Mapping[str, TensorSource],
    out: Path,
    *,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    overwrite: bool,
    provenance: dict,
    log,
    fresh_edit_head_seed: int | None = None,
) -> None:
    """Write the MGIE folder (see :mod:`mgie.model`) from a checked plan."""
    from mgie.config import save_config
    from mgie.diffusion import build_unet, build_vae
    from mgie.mllm import llava_config

    stage = _prepare_out(out, overwrite)
    try:
        writer = Writer(sources, dtype, log)
        save_config(cfg, stage / "config.yaml")
        tokenizer.save_pretrained(stage / "tokenizer")
        (stage / "mllm").mkdir()
        llava_config(cfg.model.mllm).save_pretrained(stage / "mllm")
        log("writing the LLM (mllm/)")
        writer.write_sharded(plan.parts["mllm"], stage / "mllm", max_shard_bytes)
        log("writing the edit head")
        if fresh_edit_head_seed is not None:
            _write_fresh_edit_head(cfg, fresh_edit_head_seed, dtype, stage / "edit_head.safetensors")
        else:
            writer.write_file(plan.parts["edit_head"], stage / "edit_head.safetensors")
        m = cfg.model.diffusion
        for part, build, sub in (("unet", build_unet, m.unet), ("vae", build_vae, m.vae)):
            log(f"writing the {part.upper()}")
            (stage / part).mkdir()
            with torch.device("meta"):
                build(sub).save_config(stage / part)
            writer.write_file(plan.parts[part], stage / part / "diffusion_pytorch_model.safetensors")
        (stage / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _commit_out(stage, out)


def _write_fresh_edit_head(cfg, seed: int, dtype: torch.dtype | None, path: Path) -> None:
    import warnings

    from safetensors.torch import save_file

    from mgie.edit_head import EditHead

    m = cfg.model
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="enable_nested_tensor")
        torch.manual_seed(seed)
        head = EditHead(m.edit_head, m.mllm.text.hidden_size, m.diffusion.unet.cross_attention_dim)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata=SAFETENSORS_META)


# ----------------------------------------------------------------------------- checks on values


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(specs: Sequence[str], log) -> list[dict]:
    """``PATH=HEX`` items: every file must exist and hash to HEX."""
    done = []
    for spec in specs:
        path, sep, want = spec.rpartition("=")
        want = want.strip().lower()
        if not sep or not path or not re.fullmatch(r"[0-9a-f]{64}", want):
            raise ConversionError(f"--sha256 {spec!r} must look like PATH=<64 hex digits>")
        p = Path(path)
        if not p.is_file():
            raise ConversionError(f"--sha256: file not found: {p}")
        log(f"hashing {p}")
        got = sha256_file(p)
        if got != want:
            raise ConversionError(f"sha256 mismatch for {p}: expected {want}, got {got}")
        done.append({"path": str(p), "sha256": got})
    return done


def reconcile_emb(sources: Mapping[str, TensorSource], cfg, policy: str, warn) -> dict:
    """Compare ``mllm.pt:emb`` with the [IMG] rows of ``mllm.pt:model.embed_tokens.weight``."""
    src = sources["mllm.pt"]
    if "emb" not in src.shapes:
        return {"emb": "absent", "E": "embed_tokens rows"}
    m = cfg.model.mllm
    start = m.text.vocab_size + 3
    rows = src.get("model.embed_tokens.weight")[start : start + m.num_img_tokens]
    emb = src.get("emb").reshape(m.num_img_tokens, -1)
    same = torch.equal(emb.to(rows.dtype), rows)
    if emb.dtype != rows.dtype and same:
        warn(f"mllm.pt:emb is {emb.dtype}, embed_tokens {rows.dtype}; equal after the cast")
    if same:
        return {"emb": "equal to the [IMG] rows of embed_tokens", "E": "embed_tokens rows (= emb)"}
    diff = float((emb.float() - rows.float()).abs().max())
    what = f"mllm.pt:emb differs from the [IMG] rows of model.embed_tokens.weight (max |diff| {diff:.3g})"
    if policy == "auto":
        raise ConversionError(
            f"{what}; MGIE keeps one table for the LLM input and the edit head's E, so it cannot "
            "reproduce both: pass --img-embeddings embed_tokens (LLM input exact, E from embed_tokens) "
            "or --img-embeddings emb (E exact, the LLM then reads emb at the [IMG] positions)"
        )
    warn(
        f"{what}; using {policy} for both (--img-embeddings {policy}), so the official output is not reproduced exactly"
    )
    return {"emb": f"differs (max |diff| {diff:.3g})", "E": policy}


# ----------------------------------------------------------------------------- the two routes


def _clip_vision_dict(clip_dir: Path) -> dict:
    cfg = _json(clip_dir / "config.json")
    if cfg.get("model_type") == "clip":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**(cfg.get("vision_config") or {})).to_dict()
    if cfg.get("model_type") == "clip_vision_model":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}).to_dict()
    raise ConversionError(
        f"{clip_dir}/config.json is not a CLIP config (model_type {cfg.get('model_type')!r})"
    )


def convert_official(args, log, warn) -> Path:
    """``official``: the MGIE release (mllm.pt, unet.pt) + LLaVA-7B-v1 + CLIP + a VAE -> an MGIE folder."""
    mgie_dir = _folder(args.mgie, "MGIE release (mllm.pt, unet.pt)")
    llava_dir = _folder(args.llava, "LLaVA-7B-v1")
    clip_dir = _folder(args.clip, "CLIP")
    vae_dir = component_dir(args.vae, "vae", "VAE")
    unet_json = None
    if args.unet_config:
        p = Path(args.unet_config)
        unet_json = _json(
            p if p.suffix == ".json" else component_dir(p, "unet", "UNet config") / "config.json"
        )
    sums = check_sha256(args.sha256, log)
    log("opening the sources")
    sources = {
        "mllm.pt": TensorSource("mllm.pt", [mgie_dir / "mllm.pt"]),
        "unet.pt": TensorSource("unet.pt", [mgie_dir / "unet.pt"]),
        "llava": TensorSource("llava", weight_files(llava_dir, "transformers")),
        "clip": TensorSource("clip", weight_files(clip_dir, "transformers")),
        "vae": TensorSource("vae", weight_files(vae_dir, "diffusers")),
    }
    shapes = {g: s.shapes for g, s in sources.items()}
    vae_json = _json(vae_dir / "config.json")
    cfg = official_config(
        _json(llava_dir / "config.json"), _clip_vision_dict(clip_dir), shapes, unet_json, vae_json, args.set
    )
    plan = official_plan(shapes, cfg, args.img_embeddings)
    tokenizer = official_tokenizer(llava_dir, cfg)
    emb = reconcile_emb(sources, cfg, args.img_embeddings, warn)
    provenance = _provenance(args, "official", plan, sums, {"img_embeddings": emb})
    _write(args, plan, cfg, tokenizer, sources, provenance, log)
    return Path(args.out)


def convert_llava_v1(args, log, warn) -> Path:
    """``llava-v1``: LLaVA-7B-v1 + CLIP + an IP2P UNet and VAE -> an MGIE folder, fresh edit head."""
    llava_dir = _folder(args.llava, "LLaVA-7B-v1")
    clip_dir = _folder(args.clip, "CLIP")
    unet_dir = component_dir(args.unet, "unet", "UNet")
    vae_dir = component_dir(args.vae, "vae", "VAE")
    sums = check_sha256(args.sha256, log)
    log("opening the sources")
    sources = {
        "llava": TensorSource("llava", weight_files(llava_dir, "transformers")),
        "clip": TensorSource("clip", weight_files(clip_dir, "transformers")),
        "unet": TensorSource("unet", weight_files(unet_dir, "diffusers")),
        "vae": TensorSource("vae", weight_files(vae_dir, "diffusers")),
    }
    shapes = {g: s.shapes for g, s in sources.items()}
    cfg = llava_v1_config(
        _json(llava_dir / "config.json"),
        _clip_vision_dict(clip_dir),
        shapes,
        _json(unet_dir / "config.json"),
        _json(vae_dir / "config.json"),
        args.set,
    )
    plan = llava_v1_plan(shapes, cfg)
    tokenizer = official_tokenizer(llava_dir, cfg)
    provenance = _provenance(args, "llava-v1", plan, sums, {"edit_head_seed": args.seed})
    _write(args, plan, cfg, tokenizer, sources, provenance, log, fresh_edit_head_seed=args.seed)
    return Path(args.out)


def convert_llava_hf(args, log, warn) -> Path:
    """``llava-hf``: a transformers LLaVA folder + an IP2P UNet and VAE -> an untrained MGIE folder."""
    from transformers import LlavaConfig

    src_dir = _folder(args.llava, "llava-hf")
    unet_dir = component_dir(args.unet, "unet", "UNet")
    vae_dir = component_dir(args.vae, "vae", "VAE")
    raw = _json(src_dir / "config.json")
    if "text_config" not in raw or "vision_config" not in raw:
        raise ConversionError(
            f"{src_dir}/config.json is not a llava-hf config (no text_config/vision_config); "
            "for LLaVA-7B-v1 + the MGIE release use `python -m mgie.convert official`"
        )
    try:
        llava = LlavaConfig.from_pretrained(str(src_dir))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{src_dir}/config.json: not a LlavaConfig ({e})") from None
    sums = check_sha256(args.sha256, log)
    log("opening the sources")
    sources = {
        "llava-hf": TensorSource("llava-hf", weight_files(src_dir, "transformers")),
        "unet": TensorSource("unet", weight_files(unet_dir, "diffusers")),
        "vae": TensorSource("vae", weight_files(vae_dir, "diffusers")),
    }
    shapes = {g: s.shapes for g, s in sources.items()}
    cfg = llava_hf_config(llava, _json(unet_dir / "config.json"), _json(vae_dir / "config.json"), args.set)
    plan = llava_hf_plan(shapes, cfg)
    tokenizer = llava_hf_tokenizer(src_dir, cfg)
    provenance = _provenance(args, "llava-hf", plan, sums, {"edit_head_seed": args.seed})
    _write(args, plan, cfg, tokenizer, sources, provenance, log, fresh_edit_head_seed=args.seed)
    return Path(args.out)


def _provenance(args, route: str, plan: Plan, sums: list, extra: dict) -> dict:
    names = ("mgie", "llava", "clip", "vae", "unet", "unet_config")
    inputs = {k: str(v) for k, v in vars(args).items() if k in names and v is not None}
    return {
        "route": route,
        "inputs": inputs,
        "overrides": list(args.set),
        "sha256_checked": sums,
        "ignored_source_keys": {g: len(v) for g, v in plan.ignored.items()},
        "notes": plan.notes,
        **extra,
    }


def _write(args, plan, cfg, tokenizer, sources, provenance, log, fresh_edit_head_seed=None) -> None:
    for note in plan.notes:
        log(f"note: {note}")
    write_folder(
        plan,
        cfg,
        tokenizer,
        sources,
        Path(args.out),
        dtype=None if args.dtype == "keep" else torch_dtype(args.dtype),
        max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite,
        provenance=provenance,
        log=log,
        fresh_edit_head_seed=fresh_edit_head_seed,
    )
    if args.verify:
        from mgie.model import MGIEModel

        log("verifying: loading the folder strictly")
        model = MGIEModel.from_pretrained(args.out, dtype=torch.bfloat16)
        log(f"verified: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters load")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mgie.convert`` command line: one sub-command per source format."""
    p = Parser(
        prog="python -m mgie.convert",
        description="Convert foreign checkpoints (official MGIE release, LLaVA-7B-v1, llava-hf) into an MGIE folder.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{official,llava-v1,llava-hf}")

    def common(s):
        s.add_argument("--out", required=True, help="output MGIE folder (must be new or empty)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
        s.add_argument(
            "--sha256",
            action="append",
            default=[],
            metavar="PATH=HEX",
            help="check an input file's sha256 first",
        )
        s.add_argument(
            "--dtype",
            default="keep",
            choices=["keep", "float32", "float16", "bfloat16"],
            help="dtype of the written weights (default: keep each source tensor's dtype)",
        )
        s.add_argument(
            "--max-shard-size", type=parse_size, default=parse_size("2GB"), help="LLM shard size (2GB)"
        )
        s.add_argument("--overwrite", action="store_true", help="replace an existing MGIE folder at --out")
        s.add_argument("--verify", action="store_true", help="load the result with MGIEModel.from_pretrained")
        s.add_argument("--quiet", action="store_true", help="no progress lines")

    o = sub.add_parser("official", help="Apple's MGIE release + LLaVA-7B-v1 + CLIP ViT-L/14 + VAE")
    o.add_argument("--mgie", required=True, help="folder with mllm.pt and unet.pt (mgie_7b.tar.gz extracted)")
    o.add_argument(
        "--llava", required=True, help="merged LLaVA-7B-v1 folder (weights, config.json, tokenizer.model)"
    )
    o.add_argument(
        "--clip", required=True, help="openai/clip-vit-large-patch14 folder (CLIPModel or CLIPVisionModel)"
    )
    o.add_argument("--vae", required=True, help="SD-1.5 VAE folder (or a pipeline folder with vae/)")
    o.add_argument(
        "--unet-config", help="UNet config.json or folder (default: SD-1.5 / InstructPix2Pix architecture)"
    )
    o.add_argument(
        "--img-embeddings",
        default="auto",
        choices=IMG_EMBEDDINGS,
        help="if mllm.pt:emb differs from the [IMG] rows of embed_tokens: which one to keep (auto: refuse)",
    )
    common(o)
    v = sub.add_parser(
        "llava-v1", help="LLaVA-7B-v1 + CLIP ViT-L/14 + SD-1.5/IP2P UNet + VAE -> untrained MGIE-7B"
    )
    v.add_argument("--llava", required=True, help="merged LLaVA-7B-v1 folder")
    v.add_argument("--clip", required=True, help="openai/clip-vit-large-patch14 folder")
    v.add_argument(
        "--unet",
        required=True,
        help="UNet folder: SD-1.5 (4 ch, widened; the paper) or InstructPix2Pix (8 ch)",
    )
    v.add_argument("--vae", required=True, help="VAE folder (or a pipeline folder with vae/)")
    v.add_argument("--seed", type=int, default=0, help="seed of the fresh edit head (0)")
    common(v)
    h = sub.add_parser("llava-hf", help="llava-hf LLaVA + IP2P/SD-1.5 UNet + VAE -> untrained MGIE")
    h.add_argument("--llava", required=True, help="llava-hf folder (e.g. llava-hf/llava-1.5-7b-hf)")
    h.add_argument(
        "--unet", required=True, help="UNet folder: InstructPix2Pix (8 ch) or SD-1.5 (4 ch, widened)"
    )
    h.add_argument("--vae", required=True, help="VAE folder (or a pipeline folder with vae/)")
    h.add_argument("--seed", type=int, default=0, help="seed of the fresh edit head (0)")
    common(h)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mgie.convert``: convert, print the output folder; errors are one line, exit non-zero."""
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr)

    def run() -> int:
        routes = {"official": convert_official, "llava-v1": convert_llava_v1, "llava-hf": convert_llava_hf}
        out = routes[args.command](args, log, warn)
        print(out)
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
