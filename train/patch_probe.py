"""How local an MGIE checkpoint's image features are: a linear probe per LLM layer.

``python train/patch_probe.py --checkpoint DIR --data MANIFEST [--n 300]``: the source images of
the first ``n`` examples go through the LLaVA prompt; at every layer (0: the projector's output as
the LLM receives it) the states at the <im_patch> tokens (found by id) are fitted by ridge
regression, on the first two thirds of the patches, to each patch's mean colour (R, G, B) and its
pixels' spread (the mean standard deviation over the channels, high where an object's edge is);
printed is the R^2 on the last third. A feature that does not hold its own patch's colour cannot
tell the map head or the LLM where "the red square" is (shapes_fast2: R of the projector output
0.16; the shipped pack 0.85).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from mgie.mllm import prompt_image_tokens  # noqa: E402
from mgie.pipeline import MGIEPipeline  # noqa: E402
from mgie.tokens import build_prompt, pad_sequences  # noqa: E402

TARGETS = ("R", "G", "B", "spread")


def patch_targets(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, S, S) pixels -> (B * P, 4) row-major patches' mean R, G, B and mean channel spread."""
    mean = F.avg_pool2d(pixels, patch)  # (B, 3, g, g)
    spread = (
        (F.avg_pool2d(pixels**2, patch) - mean**2).clamp_min(0).sqrt().mean(1, keepdim=True)
    )  # (B, 1, g, g)
    return torch.cat([mean, spread], 1).flatten(2).transpose(1, 2).reshape(-1, 4)


def probe_r2(features: torch.Tensor, targets: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """Ridge regression (float64, with a bias) of ``targets`` (N, K) on ``features`` (N, D), fitted
    on the first two thirds of the rows; the R^2 of each target on the last third, (K,)."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)  # (N, D + 1)
    y, cut = targets.double(), len(features) * 2 // 3
    a = x[:cut]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y[:cut])
    err = ((x[cut:] @ w - y[cut:]) ** 2).sum(0)  # (K,)
    return 1 - err / ((y[cut:] - y[cut:].mean(0)) ** 2).sum(0)


def main() -> int:
    """Print each layer's probe R^2 and mean state norm."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a shapes manifest folder")
    p.add_argument("--n", type=int, default=300, help="images (64 patches each for mgie-shapes)")
    args = p.parse_args()
    pipe = MGIEPipeline.from_pretrained(args.checkpoint)
    model, ids, m = pipe.model, pipe.model.ids, pipe.cfg.model.mllm
    rows = [json.loads(line) for line in open(Path(args.data) / "manifest.jsonl")][: args.n]
    layers, targets = None, []
    for s in range(0, len(rows), 50):
        chunk = rows[s : s + 50]
        images = [Image.open(Path(args.data) / r["source"]).convert("RGB") for r in chunk]
        pixels = pipe.clip(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
        prompts = [build_prompt(pipe.tokenizer, ids, r["instruction"], prompt_image_tokens(m), m.system_prompt)
                   for r in chunk]  # fmt: skip
        input_ids, mask = pad_sequences(prompts, ids.pad, side="left")
        with torch.no_grad():
            _, states = model.mllm_forward(input_ids, mask, pixels, layers=True)  # every layer's (B, L, D)
        layers = layers or [[] for _ in states]
        for i, h in enumerate(states):
            layers[i].append(model.patch_states(h, input_ids).flatten(0, 1).float())  # (B * P, D)
        targets.append(patch_targets(pixels.float(), m.vision.patch_size))
    y = torch.cat(targets)
    print(f"probe R^2 on the last third of {len(y)} patches ({len(rows)} images): " + ", ".join(TARGETS))
    for i, chunks in enumerate(layers):
        x = torch.cat(chunks)
        r2 = " ".join(f"{v:6.3f}" for v in probe_r2(x, y).tolist())
        print(f"layer {i}: {r2}   mean norm {x.norm(dim=1).mean():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
