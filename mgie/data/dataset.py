"""The training dataset: ``EditRecord`` -> model inputs, and the batch collation.

Image preparation follows the official recipe (mgie_train.py L44-52, L540): both images are
centre-cropped to a square and resized to 512; the CLIP branch gets that crop through the CLIP
processor (224 for ViT-L/14), the diffusion branch a ``resolution`` x ``resolution`` resize.
"""

from __future__ import annotations

import random

import torch
from PIL import Image
from torch.utils.data import Dataset

from mgie.config import MGIEConfig
from mgie.data.records import EditRecord
from mgie.expressive import default_expressive
from mgie.images import to_tensor
from mgie.mllm import prompt_image_tokens
from mgie.tokens import IGNORE_INDEX, TokenIds, build_prompt, build_target, encode_chunk, pad_sequences


def center_square(img: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to ``side`` x ``side`` (bicubic; 0 or equal: no resize)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)) if w != h else img
    return img if side in (0, s) else img.resize((side, side), Image.Resampling.BICUBIC)


def reword(instruction: str, expressive: str, rng: random.Random, explicit: float, dropout: float) -> str:
    """A training-time rewording of a terse instruction (beyond the paper).

    With probability ``explicit`` the instruction is the expressive text itself: an explicit
    request is a request too, and it puts the words of the operation ("grayscale") into the
    model's input, where the terse wordings never have them. Otherwise each word the expressive
    text does not contain (the wording: "make it", "get rid of") is dropped with probability
    ``dropout``, and at least one word is kept, so that the model reads the content words rather
    than learning each template by heart (mgie-shapes wrote the wrong text for new wordings).
    """
    if rng.random() < explicit:
        return expressive
    content = set(expressive.split())
    words = instruction.split()
    kept = [w for w in words if w in content or rng.random() >= dropout]
    return " ".join(kept) if kept else rng.choice(words)


def _resize(img: Image.Image, side: int) -> Image.Image:
    return img if img.size == (side, side) else img.resize((side, side), Image.Resampling.BICUBIC)


class EditDataset(Dataset):
    """Turns records into ``input_ids``/``labels`` (assistant turn only), CLIP pixels and images.

    ``captions`` (image-text pairs) follow the edit ``records``; their items say ``has_edit`` False,
    so they train the instruction CE only.
    """

    def __init__(
        self,
        records: list[EditRecord],
        tokenizer,
        ids: TokenIds,
        cfg: MGIEConfig,
        captions: list[EditRecord] = (),
    ):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        self.records, self.tokenizer, self.ids, self.cfg = [*records, *captions], tokenizer, ids, cfg
        self.num_edits = len(records)
        v = cfg.model.mllm.vision
        self.num_patches = prompt_image_tokens(cfg.model.mllm)
        self.clip = CLIPImageProcessorPil(
            size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size}
        )

    def __len__(self) -> int:
        return len(self.records)

    def tokens(self, instruction: str, expressive: str | None) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``; texts over their token budgets (config) are cut."""
        d = self.cfg.data
        instruction = self._cut(instruction, d.max_instruction_tokens)
        if not self.cfg.model.mllm.expressive:
            expressive = ""  # IP2P baseline: the assistant turn is just [IMG0..N-1] </s>
        else:
            expressive = self._cut(expressive or default_expressive(instruction), d.max_expressive_tokens)
        prompt = build_prompt(
            self.tokenizer, self.ids, instruction, self.num_patches, self.cfg.model.mllm.system_prompt
        )
        target = build_target(self.tokenizer, self.ids, expressive)
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    def instruction(self, i: int) -> str:
        """Row ``i``'s instruction as trained: :func:`reword` (``data.explicit_instructions``,
        ``data.wording_dropout``) for an edit row with an expressive text, the same for every
        epoch and every resume (the draw is seeded by ``train.seed`` and ``i``); else as written."""
        rec, d = self.records[i], self.cfg.data
        if not (d.explicit_instructions or d.wording_dropout) or i >= self.num_edits or not rec.expressive:
            return rec.instruction
        rng = random.Random(f"{self.cfg.train.seed}-{i}")
        return reword(rec.instruction, rec.expressive, rng, d.explicit_instructions, d.wording_dropout)

    def _cut(self, text: str, limit: int) -> str:
        ids = encode_chunk(self.tokenizer, text)
        return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        side = self.cfg.data.crop_side
        src, tgt = center_square(rec.source.load(), side), center_square(rec.target.load(), side)
        res = self.cfg.data.resolution
        input_ids, labels = self.tokens(self.instruction(i), rec.expressive)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.clip(images=[src], return_tensors="pt")["pixel_values"][0],  # (3, S, S)
            "source": to_tensor([_resize(src, res)])[0],  # (3, R, R)
            "target": to_tensor([_resize(tgt, res)])[0],  # (3, R, R)
            "has_edit": i < self.num_edits,
        }


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences (labels with -100) and stack the images."""
    input_ids, mask = pad_sequences([it["input_ids"] for it in items], pad_id, side="right")
    labels, _ = pad_sequences([it["labels"] for it in items], IGNORE_INDEX, side="right")
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        **{k: torch.stack([it[k] for it in items]) for k in ("pixel_values", "source", "target")},
        "has_edit": torch.tensor([it["has_edit"] for it in items]),  # (B,) bool
    }
