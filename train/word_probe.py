"""How much an MGIE checkpoint's UNet conditioning depends on one word of the expressive text.

``python train/word_probe.py --checkpoint DIR --data MANIFEST [--n 50] [--word colour|corner]``:
for the shapes world's add and recolour examples (``--word corner``: add and move), the condition
(teacher-forced on the ground-truth expressive text) is recomputed with its last colour word (or
its corner, "top left" ...) swapped for another; printed is the mean relative change
``|c(swapped) - c| / |c|`` beside the change between two different examples' conditions.
A condition that does not follow the word cannot tell the UNet which colour to paint or where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mgie.data.shapes import COLORS, CORNERS  # noqa: E402
from mgie.mllm import prompt_image_tokens  # noqa: E402
from mgie.pipeline import MGIEPipeline  # noqa: E402
from mgie.tokens import build_prompt, encode_chunk, pad_sequences  # noqa: E402


def condition(pipe: MGIEPipeline, image: Image.Image, instruction: str, text: str) -> torch.Tensor:
    """The (1, Q, C) condition of prompt + ``text`` + [IMG] tokens (the training computation)."""
    m, mc = pipe.model, pipe.cfg.model.mllm
    prompt = build_prompt(pipe.tokenizer, m.ids, instruction, prompt_image_tokens(mc), mc.system_prompt)
    ids, mask = pad_sequences([prompt + encode_chunk(pipe.tokenizer, text) + list(m.ids.img)], m.ids.pad)
    pixels = pipe.clip(images=[image], return_tensors="pt")["pixel_values"]
    _, hidden = m.mllm_forward(ids, mask, pixels)
    return m.condition(hidden, ids, torch.arange(ids.shape[1])[None] >= len(prompt))


def swapped(text: str, word: str) -> str:
    """``text`` with its last colour word (``word="colour"``) or its corner phrase replaced by
    the first other one of the world's list."""
    if word == "corner":
        old = next(c for c in CORNERS if c in text)
        return text.replace(old, next(c for c in CORNERS if c != old))
    words = text.split()
    i = max(k for k, w in enumerate(words) if w in COLORS)
    words[i] = next(c for c in COLORS if c != words[i])
    return " ".join(words)


def main() -> int:
    """Print the word-swap and the between-example changes per edit."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a shapes manifest folder")
    p.add_argument("--n", type=int, default=50, help="examples per edit")
    p.add_argument("--word", choices=("colour", "corner"), default="colour", help="the word to swap")
    args = p.parse_args()
    pipe = MGIEPipeline.from_pretrained(args.checkpoint)
    rows = [json.loads(line) for line in open(Path(args.data) / "manifest.jsonl")]
    with torch.no_grad():
        for edit in ("add", "recolour") if args.word == "colour" else ("add", "move"):
            swap, other, prev = [], [], None
            for r in [r for r in rows if r.get("edit") == edit][: args.n]:
                img = Image.open(Path(args.data) / r["source"]).convert("RGB")
                c = condition(pipe, img, r["instruction"], r["expressive"])
                c2 = condition(pipe, img, r["instruction"], swapped(r["expressive"], args.word))
                swap.append(float((c2 - c).norm() / c.norm()))
                if prev is not None:
                    other.append(float((c - prev).norm() / c.norm()))
                prev = c
            print(
                f"{edit}: {args.word} swapped {sum(swap) / len(swap):.4f}, "
                f"next example {sum(other) / len(other):.4f} (mean relative change, {len(swap)} examples)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
