"""``MGIEPipeline``: image + terse instruction -> expressive instruction + edited image.

1. The MLLM greedily writes the expressive instruction (stopping at ``</s>`` or ``[IMG0]``).
2. One teacher-forced pass over prompt + text + ``[IMG0..N-1]`` gives the [IMG] hidden states,
   with the very functions training uses (``MGIEModel.mllm_forward`` / ``condition``). The
   hidden state at a position depends only on the tokens up to it, so forcing the [IMG] tokens
   gives exactly the states of a model that emits them itself, and a sane condition otherwise.
3. The edit head maps them to UNet conditioning; IP2P sampling with three-way guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from mgie.diffusion import decode, encode_source, sample, sampling_scheduler, vae_scale_factor
from mgie.images import fit_size, keep_unchanged, to_pil, to_tensor
from mgie.mllm import prompt_image_tokens
from mgie.model import MGIEModel
from mgie.tokens import build_prompt, encode_chunk, normalize_text, pad_sequences

MAX_INSTRUCTION_TOKENS = 256


@dataclass
class EditResult:
    """Edited images (input sizes) and the expressive instructions that drove them."""

    images: list[Image.Image]
    expressive: list[str]


class MGIEPipeline:
    """Runs a trained :class:`MGIEModel` on images and instructions."""

    def __init__(self, model: MGIEModel):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.cfg = model.cfg
        side = self.cfg.model.mllm.vision.image_size
        self.clip = CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, overrides=None
    ):
        """Load a checkpoint folder onto ``device``; ``overrides`` are ``key=value`` config settings."""
        return cls(MGIEModel.from_pretrained(path, dtype=dtype, overrides=overrides).to(device))

    # ------------------------------------------------------------------ MLLM side

    def check_instruction(self, instruction: str) -> str:
        """Normalised instruction; ``ValueError`` if it is empty or too long."""
        text = normalize_text(instruction)
        if not text:
            raise ValueError("the instruction is empty")
        n = len(encode_chunk(self.tokenizer, text))
        limit = min(MAX_INSTRUCTION_TOKENS, self._context_left())
        if n > limit:
            raise ValueError(f"the instruction is too long: {n} tokens (limit {limit})")
        return text

    def _context_left(self) -> int:
        """Tokens left for the instruction in the LLM context after the fixed prompt and outputs."""
        m = self.cfg.model.mllm
        fixed = len(build_prompt(self.tokenizer, self.model.ids, "", prompt_image_tokens(m), m.system_prompt))
        return m.text.max_position_embeddings - fixed - self.cfg.inference.max_new_tokens - m.num_img_tokens

    @torch.no_grad()
    def describe(self, images: list[Image.Image], instructions: list[str]) -> tuple[list[str], torch.Tensor]:
        """Expressive instructions and UNet conditioning (B, Q, C) for RGB images + instructions."""
        expressive, cond, _ = self._describe(images, instructions)
        return expressive, cond

    @torch.no_grad()
    def _describe(
        self, images: list[Image.Image], instructions: list[str]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """:meth:`describe`, and the predicted edit map (B, 1, g, g) (None without a map head)."""
        model, ids = self.model, self.model.ids
        device = model.device
        texts = [self.check_instruction(t) for t in instructions]
        pixels = self.clip(images=images, return_tensors="pt")["pixel_values"].to(device)  # (B, 3, S, S)
        m = self.cfg.model.mllm
        prompts = [
            build_prompt(self.tokenizer, ids, t, prompt_image_tokens(m), m.system_prompt) for t in texts
        ]
        input_ids, mask = pad_sequences(prompts, ids.pad, side="left")
        if self.cfg.model.mllm.expressive:
            text_ids = self._generate(input_ids.to(device), mask.to(device), pixels)
        else:  # IP2P baseline: no text, the [IMG] tokens follow the prompt
            text_ids = [[] for _ in prompts]
        full = [p + t + list(ids.img) for p, t in zip(prompts, text_ids)]
        full_ids, full_mask = pad_sequences(full, ids.pad, side="left")
        full_ids, full_mask = full_ids.to(device), full_mask.to(device)
        # Left padding: each row's answer (text + [IMG] tokens) is its last len(t) + N positions.
        span = torch.tensor([len(t) + len(ids.img) for t in text_ids], device=device)  # (B,)
        answer = torch.arange(full_ids.shape[1], device=device) >= full_ids.shape[1] - span[:, None]
        _, hidden = model.mllm_forward(full_ids, full_mask, pixels)  # (B, L, D)
        cond = model.condition(hidden, full_ids, answer)  # (B, Q, C)
        maps = model.edit_map(hidden, full_ids, answer)  # (B, 1, g, g) or None
        expressive = [normalize_text(self.tokenizer.decode(t, skip_special_tokens=True)) for t in text_ids]
        return expressive, cond, maps

    def _generate(self, input_ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> list[list[int]]:
        """Greedy expressive text of each row, up to (not including) ``</s>`` or any MGIE token."""
        model, ids, inf = self.model, self.model.ids, self.cfg.inference
        image = {"pixel_values": pixels.to(model.mllm.dtype)} if self.cfg.model.mllm.use_image else {}
        out = model.mllm.generate(
            input_ids=input_ids,
            attention_mask=mask,
            **image,
            max_new_tokens=inf.max_new_tokens,
            do_sample=False,
            num_beams=1,
            no_repeat_ngram_size=inf.no_repeat_ngram_size,
            eos_token_id=[ids.eos, ids.img[0]],
            pad_token_id=ids.pad,
        )
        stop = {ids.eos, ids.im_patch, ids.im_start, ids.im_end, *ids.img}  # text ends at any of these
        return [_until(row, stop) for row in out[:, input_ids.shape[1] :].tolist()]

    # ------------------------------------------------------------------ diffusion side

    @torch.no_grad()
    def __call__(
        self,
        images: list[Image.Image],
        instructions: list[str],
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        max_side: int | None = None,
        progress: bool = True,
        keep: float | None = None,
    ) -> EditResult:
        """Edit RGB ``images`` following ``instructions`` (unset options take the config's values;
        ``keep`` is ``inference.keep_unchanged``: > 0 keeps the source's pixels where nothing changed)."""
        inf = self.cfg.inference
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        steps = steps or inf.steps
        seed = inf.seed if seed is None else seed
        keep = inf.keep_unchanged if keep is None else keep
        expressive, cond, maps = self._describe(images, instructions)
        model, device = self.model, self.model.device
        null = model.null_condition()  # (1, Q, C)
        sched = sampling_scheduler(scheduler or inf.scheduler, self.cfg.model.diffusion.noise)
        cell = vae_scale_factor(model.vae)  # pixels per latent cell
        multiple = max(8, cell)
        sizes = [fit_size(*img.size, max_side or inf.max_side, multiple) for img in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        outputs: list[Image.Image | None] = [None] * len(images)
        for (w, h), idx in groups.items():  # one diffusion batch per size
            src = to_tensor([images[i].resize((w, h), Image.Resampling.LANCZOS) for i in idx]).to(device)
            # One generator per image, each seeded alike: an image's result does not depend on its batch.
            gens = [torch.Generator(device=device).manual_seed(seed) for _ in idx]
            latents = sample(
                model.unet, sched, encode_source(model.vae, src), cond[idx], null, steps,
                inf.guidance if guidance is None else guidance,
                inf.image_guidance if image_guidance is None else image_guidance, gens,
                progress=partial(tqdm, desc=f"diffusion {w}x{h} x{len(idx)}", leave=False) if progress else None,
                edit_map=None if maps is None else maps[idx],
            )  # fmt: skip
            decoded = decode(model.vae, latents)  # (b, 3, h, w) in [0, 1]
            for k, (i, out) in enumerate(zip(idx, to_pil(decoded))):
                size = images[i].size
                out = out if out.size == size else out.resize(size, Image.Resampling.LANCZOS)
                if keep > 0:
                    out = keep_unchanged(images[i], out, src[k] / 2 + 0.5, decoded[k], keep, cell)
                outputs[i] = out
        return EditResult(images=outputs, expressive=expressive)


def _until(row: list[int], stop: set[int]) -> list[int]:
    """The tokens of ``row`` before the first stop token."""
    for i, tok in enumerate(row):
        if tok in stop:
            return row[:i]
    return row
