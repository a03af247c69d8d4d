"""``MGIEModel``: the MLLM, the edit head and the IP2P UNet/VAE composed, with both losses.

The diffusion modules live *beside* the transformers model, never inside it, so no HF weight
initialisation can touch them (the official code's init trap, reference section 2.4).

Folder layout of ``save_pretrained`` / ``from_pretrained``::

    config.yaml          resolved MGIEConfig
    tokenizer/           tokenizer with the MGIE tokens
    mllm/                llava-hf folder (config.json, model.safetensors), LoRA and [IMG] rows merged
    edit_head.safetensors
    unet/ vae/           diffusers folders (safetensors)
    patch_decoder.safetensors   training only (``model.loss.patch_weight``): kept so that a run
                         continued from the folder does not restart it; inference ignores it
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mgie.config import MGIEConfig, load_config, save_config
from mgie.diffusion import (
    UNET_KEYS,
    VAE_KEYS,
    architecture_mismatch,
    build_unet,
    build_vae,
    change_weights,
    edit_loss,
    edit_map_target,
    encode_source,
    encode_target,
    noise_scheduler,
    vae_scale_factor,
)
from mgie.edit_head import EditHead
from mgie.mllm import (
    base_state_dict,
    build_mllm,
    default_token_ids,
    freeze,
    load_mllm,
    make_trainable,
    merged_state_dict,
    num_patches,
)
from mgie.tokens import TokenIds, img_hidden_states, text_states, token_ids

FOLDER_FILES = ("config.yaml", "tokenizer", "mllm", "edit_head.safetensors", "unet", "vae")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or does not match its config."""


@dataclass
class MGIEOutput:
    """Losses of one training forward pass
    (``loss = lm_weight * lm_loss + edit_weight * edit_loss [+ map_weight * map_loss]
    [+ patch_weight * patch_loss]``)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    edit_loss: torch.Tensor
    map_loss: torch.Tensor | None = None  # the edit map's BCE (model.edit_head.map_grid only)
    patch_loss: torch.Tensor | None = None  # the patch decoder's MSE (model.loss.patch_weight only)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: (B, L) mask -> (B, L) positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class MGIEModel(nn.Module):
    """MGIE: LLaVA (+LoRA, trainable [IMG] rows) -> edit head -> InstructPix2Pix UNet (VAE frozen)."""

    def __init__(
        self,
        cfg: MGIEConfig,
        mllm: nn.Module,
        edit_head: EditHead,
        unet: nn.Module,
        vae: nn.Module,
        ids: TokenIds,
        tokenizer=None,
    ):
        super().__init__()
        self.cfg = cfg
        self.mllm = mllm
        self.edit_head = edit_head
        self.unet = unet
        self.vae = freeze(vae).eval()
        self.ids = ids
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler(cfg.model.diffusion.noise)
        v = cfg.model.mllm.vision
        self.patch_decoder = (  # training only (model.loss.patch_weight); saved for continuations
            nn.Linear(cfg.model.mllm.text.hidden_size, 3 * v.patch_size**2)
            if cfg.model.loss.patch_weight
            else None
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: MGIEConfig, tokenizer=None, adapters: bool = True) -> MGIEModel:
        """Build with random weights. With a tokenizer, token ids are read from it by name and
        must equal the config's layout; without one (e.g. on the meta device) they are derived."""
        m = cfg.model
        ids = _check_ids(cfg, tokenizer)
        mllm = build_mllm(m.mllm)
        if adapters:
            mllm = make_trainable(mllm, m.mllm, m.lora, ids)
        return cls._assemble(
            cfg, mllm, ids, tokenizer, build_unet(m.diffusion.unet), build_vae(m.diffusion.vae)
        )

    @classmethod
    def _assemble(cls, cfg, mllm, ids, tokenizer, unet, vae) -> MGIEModel:
        m = cfg.model
        if unet.config.cross_attention_dim != m.diffusion.unet.cross_attention_dim:
            raise CheckpointError("UNet cross_attention_dim does not match the config")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            head = EditHead(
                m.edit_head, m.mllm.text.hidden_size, unet.config.cross_attention_dim, num_patches(m.mllm)
            )
        if m.mllm.gradient_checkpointing:
            mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return cls(cfg, mllm, head, unet, vae, ids, tokenizer)

    # ------------------------------------------------------------------ shared pieces

    def mllm_forward(self, input_ids, attention_mask, pixel_values, layers: bool = False):
        """Teacher-forced LLaVA pass: ``(logits (B, L, V), last-layer post-norm hidden (B, L, D))``;
        with ``layers`` the second item is every layer's (B, L, D) states instead, 0 being the
        LLM's input embeddings (the image features in place) and -1 the last layer's.

        Positions come from the attention mask, so left and right padding give the same states.
        """
        out = self.mllm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            pixel_values=pixel_values.to(self.mllm.dtype) if self.cfg.model.mllm.use_image else None,
            output_hidden_states=True,
            use_cache=False,
        )
        return out.logits, out.hidden_states if layers else out.hidden_states[-1]

    def patch_states(self, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) states -> (B, P, D) those at the <im_patch> tokens (found by id), row-major."""
        at = input_ids == self.ids.im_patch  # (B, L), P per row
        return states[at].view(len(states), -1, states.shape[-1])

    def patch_loss(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """The auxiliary locality loss (``model.loss.patch_weight``): :attr:`patch_decoder` maps
        each image feature at the <im_patch> tokens (found by id; (B, L, D) input embeddings) to
        its patch's pixels, MSE against the CLIP-normalised ``pixel_values`` (B, 3, S, S)."""
        p = self.cfg.model.mllm.vision.patch_size
        feats = self.patch_states(embeds, input_ids)  # (B, P, D)
        truth = nn.functional.unfold(pixel_values.float(), p, stride=p).transpose(1, 2)  # (B, P, 3 p p)
        return nn.functional.mse_loss(self.patch_decoder(feats.float()), truth)

    def img_embeddings(self) -> torch.Tensor:
        """The [IMG] rows of the (trainable) input embeddings, looked up by id: (N, D)."""
        ids = torch.tensor(self.ids.img, device=self.device)
        return self.mllm.get_input_embeddings()(ids)

    def head_inputs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, answer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What the edit head reads from a teacher-forced pass (B, L, D), in the head's dtype:
        ``([IMG] states (B, N, D), [IMG] embeddings (N, D), text (B, T, D) or None, mask (B, T) or None)``.

        With ``edit_head.read_text`` the text is the expressive text, the tokens of ``answer``
        (B, L; True over the assistant turn) before [IMG0]: their states plus input embeddings,
        each embedding rescaled to its state's norm (:func:`mgie.tokens.text_states`).
        """
        h = img_hidden_states(hidden, input_ids, self.ids.img)  # (B, N, D)
        e = self.img_embeddings()  # (N, D)
        dtype = self.edit_head.llm2hid.weight.dtype
        if not self.cfg.model.edit_head.read_text:
            return h.to(dtype), e.to(dtype), None, None
        if answer is None:
            raise ValueError("edit_head.read_text needs the answer span of each row")
        emb = self.mllm.get_input_embeddings()(input_ids).to(hidden.dtype)  # (B, L, D)
        # Rescaled to its state's norm: raw, the embedding is 4% of the sum (mgie-shapes: 0.69 vs
        # 19), and the last-layer state at a colour word changes by 0.4% when the colour does.
        scale = hidden.norm(dim=-1, keepdim=True) / emb.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        both = hidden + emb * scale  # (B, L, D)
        text, mask = text_states(both, input_ids, answer, self.ids.img[0])  # (B, T, D), (B, T)
        return h.to(dtype), e.to(dtype), text.to(dtype), mask

    def condition(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, answer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """UNet conditioning from a teacher-forced pass: (B, L, D) states -> (B, Q, C)
        (``answer`` as :meth:`head_inputs`)."""
        return self.edit_head(*self.head_inputs(hidden, input_ids, answer))

    def edit_map(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, answer: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The predicted edit map from a teacher-forced pass, (B, 1, g, g) probabilities; None
        without ``edit_head.map_grid`` (the paper's model)."""
        if not self.cfg.model.edit_head.map_grid:
            return None
        return torch.sigmoid(
            self.edit_map_logits(hidden, input_ids, self.head_inputs(hidden, input_ids, answer))
        )

    def edit_map_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, inputs: tuple) -> torch.Tensor:
        """Edit-map logits (B, 1, g, g), float32, from :meth:`head_inputs` ``inputs`` and, with
        ``edit_head.map_image`` or ``map_cells``, the last-layer states at the image patches (found by id)."""
        patches = None
        if self.cfg.model.edit_head.map_image or self.cfg.model.edit_head.map_cells:
            patches = self.patch_states(hidden, input_ids).to(inputs[0].dtype)  # (B, P, D)
        return self.edit_head.edit_map(*inputs, patches=patches).float()

    def null_condition(self, batch: int = 1) -> torch.Tensor:
        """Null text condition: the edit head on zero states plus the [IMG] embeddings; (batch, Q, C)."""
        return self.edit_head.null(self.img_embeddings().to(self.edit_head.llm2hid.weight.dtype), batch)

    @property
    def device(self) -> torch.device:
        """Device of the edit head (the model is kept on one device)."""
        return self.edit_head.query.device

    # ------------------------------------------------------------------ training

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        pixel_values,
        source,
        target,
        has_edit: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MGIEOutput:
        """Both MGIE losses for a batch.

        ``input_ids``/``attention_mask``/``labels`` (B, L) with the assistant turn supervised;
        ``pixel_values`` (B, 3, S, S) CLIP input; ``source``/``target`` (B, 3, H, W) in [-1, 1];
        ``has_edit`` (B,) bool, False for rows with no edit to learn (image-text pairs: the CE only;
        None: every row). The editing loss is the mean over the rows with an edit.
        """
        w = self.cfg.model.loss
        logits, states = self.mllm_forward(input_ids, attention_mask, pixel_values, layers=True)
        hidden = states[-1]  # (B, L, D)
        patch = self.patch_loss(states[0], input_ids, pixel_values) if w.patch_weight else None
        extra = w.patch_weight * patch if patch is not None else 0  # before rows are dropped below
        lm = nn.functional.cross_entropy(  # next-token CE over the assistant turn
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        if has_edit is not None and not has_edit.all():
            keep = has_edit.nonzero().squeeze(1)  # (B',) the rows with an edit
            hidden, input_ids, labels = hidden[keep], input_ids[keep], labels[keep]
            source, target = source[keep], target[keep]
        grid, edit_map, bce = self.cfg.model.edit_head.map_grid, None, None
        inputs = self.head_inputs(hidden, input_ids, labels != -100) if len(source) else None
        if grid and len(source):  # the predicted edit map: its BCE, and the map the UNet reads
            logits = self.edit_map_logits(hidden, input_ids, inputs)  # (B, 1, g, g)
            truth = edit_map_target(source.float(), target.float(), grid)  # (B, 1, g, g)
            bce = nn.functional.binary_cross_entropy_with_logits(logits, truth)
            teach = torch.rand(len(truth), device=truth.device, generator=generator) < w.map_teacher  # (B,)
            edit_map = torch.where(teach[:, None, None, None], truth, torch.sigmoid(logits).detach())
        if not w.edit_weight or not len(source):  # an LM-only (or LM + map) stage or batch: no diffusion
            edit = torch.zeros((), device=lm.device)
            loss = w.lm_weight * lm + (w.map_weight * bce if bce is not None else 0) + extra
            return MGIEOutput(loss=loss, lm_loss=lm, edit_loss=edit, map_loss=bce, patch_loss=patch)
        cond = self.edit_head(*inputs)  # (B', Q, C)
        null = self.null_condition()  # (1, Q, C)
        tgt = encode_target(self.vae, target, generator)  # (B, 4, h, w)
        src = encode_source(self.vae, source)  # (B, 4, h, w)
        weights = (
            change_weights(source, target, vae_scale_factor(self.vae), w.change_weight)
            if w.change_weight
            else None
        )  # (B, 1, h, w) or None
        edit = edit_loss(
            self.unet, self.noise_scheduler, tgt, src, cond, null, w, generator, weights, edit_map
        )
        loss = w.lm_weight * lm + w.edit_weight * edit + extra
        if bce is not None:
            loss = loss + w.map_weight * bce
        return MGIEOutput(loss=loss, lm_loss=lm, edit_loss=edit, map_loss=bce, patch_loss=patch)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``lora``, ``img_tokens``, ``mllm`` (full training),
        ``edit_head``, ``edit_map`` (the edit head's :class:`~mgie.edit_head.MapHead`, when it has one), ``unet``;
        the training-only patch decoder (``model.loss.patch_weight``) trains with ``mllm``."""
        groups: dict[str, list[nn.Parameter]] = {
            k: [] for k in ("lora", "img_tokens", "mllm", "edit_head", "edit_map", "unet")
        }
        for name, p in self.mllm.named_parameters():
            if p.requires_grad:
                key = "img_tokens" if "trainable_tokens" in name else "lora" if "lora_" in name else "mllm"
                groups[key].append(p)
        if self.patch_decoder is not None:
            groups["mllm"] += [p for p in self.patch_decoder.parameters() if p.requires_grad]
        for name, p in self.edit_head.named_parameters():
            if p.requires_grad:
                groups["edit_map" if name.startswith("map_head.") else "edit_head"].append(p)
        groups["unet"] = [p for p in self.unet.parameters() if p.requires_grad]
        return groups

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path, merge_adapters: bool = True) -> None:
        """Write the inference folder (see module docstring).

        ``merge_adapters``: LoRA and the [IMG] rows are merged into ``mllm/`` (a plain llava-hf
        folder); otherwise ``mllm/`` keeps the base weights and ``adapter/`` the peft adapter.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, path / "config.yaml")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / "tokenizer")
        base = build_mllm_like(self.mllm)
        if merge_adapters or base is self.mllm:
            base.save_pretrained(path / "mllm", state_dict=merged_state_dict(self.mllm))
        else:
            base.save_pretrained(path / "mllm", state_dict=base_state_dict(self.mllm))
            self.mllm.save_pretrained(path / "adapter")
        edit_head = {k: v.detach().contiguous() for k, v in self.edit_head.state_dict().items()}
        save_file(edit_head, path / "edit_head.safetensors")
        self.unet.save_pretrained(path / "unet")
        self.vae.save_pretrained(path / "vae")
        if self.patch_decoder is not None:
            decoder = {k: v.detach().contiguous() for k, v in self.patch_decoder.state_dict().items()}
            save_file(decoder, path / "patch_decoder.safetensors")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        adapters: bool = False,
        overrides: list[str] | None = None,
        cfg: MGIEConfig | None = None,
        skip_map_head: bool = False,
        fresh_unet: bool = False,
    ) -> MGIEModel:
        """Load a folder written by :meth:`save_pretrained`; every weight must be present and fit.

        ``adapters=True`` makes it trainable as ``model.mllm.trainable`` says (fresh LoRA/[IMG]
        adapters, or every weight) for further training; ``cfg``
        replaces the folder's config (e.g. a fine-tuning run's), and must fit its weights;
        ``skip_map_head`` leaves the folder's edit-map head out (training replaces it);
        ``fresh_unet`` builds the UNet from ``cfg`` with random weights instead of loading the folder's.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        missing = [f for f in FOLDER_FILES if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path} is not an MGIE checkpoint: missing {missing}")
        cfg = cfg if cfg is not None else load_config(path / "config.yaml", overrides)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        ids = _check_ids(cfg, tokenizer)
        mllm = freeze(load_mllm(path / "mllm", cfg.model.mllm, dtype, cfg.model.quantization))
        if (path / "adapter").is_dir():  # saved with merge_adapters=False
            from peft import PeftModel

            mllm = PeftModel.from_pretrained(mllm, path / "adapter", is_trainable=adapters)
        elif adapters:
            mllm = make_trainable(mllm, cfg.model.mllm, cfg.model.lora, ids)
        d = cfg.model.diffusion
        unet = (
            build_unet(d.unet) if fresh_unet else load_diffusers(UNet2DConditionModel, path / "unet", dtype)
        )
        vae = load_diffusers(AutoencoderKL, path / "vae", dtype)
        for name, part, section, keys in (("unet", unet, d.unet, UNET_KEYS), ("vae", vae, d.vae, VAE_KEYS)):
            wrong = architecture_mismatch(section, dict(part.config), keys, f"model.diffusion.{name}")
            if wrong:  # the weights would load and compute something else
                raise CheckpointError(f"{path / name}: {wrong}")
        model = cls._assemble(cfg, mllm, ids, tokenizer, unet, vae)
        state = load_file(path / "edit_head.safetensors")
        if skip_map_head:
            state = {k: v for k, v in state.items() if not k.startswith("map_head.")}
        load_strict(model.edit_head, state, path / "edit_head.safetensors")
        decoder = path / "patch_decoder.safetensors"  # training only: a model without one ignores it
        if model.patch_decoder is not None and decoder.is_file():
            load_strict(model.patch_decoder, load_file(decoder), decoder)
        if cfg.model.quantization.bits:  # k-bit layers keep their storage; the rest is already in dtype
            return model.to(device=model.vae.device)
        return model.to(dtype=dtype)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """``module.load_state_dict(state, strict=True)``; a key or shape that does not fit is a
    one-line :class:`CheckpointError` naming ``file``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: {str(e).splitlines()[0]}") from None


def build_mllm_like(mllm: nn.Module) -> nn.Module:
    """The plain LLaVA under a (possibly peft-wrapped) model, for ``save_pretrained``'s config."""
    return mllm.get_base_model() if hasattr(mllm, "get_base_model") else mllm


def _check_ids(cfg: MGIEConfig, tokenizer) -> TokenIds:
    """Token ids by name from the tokenizer, checked against the layout the config implies."""
    expected = default_token_ids(cfg.model.mllm)
    if tokenizer is None:
        return expected
    ids = token_ids(tokenizer, cfg.model.mllm.num_img_tokens)
    got = (ids.im_patch, ids.im_start, ids.im_end, ids.img)
    want = (expected.im_patch, expected.im_start, expected.im_end, expected.img)
    if got != want:
        raise CheckpointError(
            f"tokenizer MGIE token ids {got} differ from the config's vocabulary layout {want}"
        )
    return ids


def load_diffusers(cls, path: Path, dtype: torch.dtype):
    """Load a diffusers model folder strictly (missing or unexpected weights raise)."""
    try:
        model, info = cls.from_pretrained(path, torch_dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from None
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise CheckpointError(f"{path}: weights do not match: {bad}")
    return model
