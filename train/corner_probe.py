"""Where an MGIE checkpoint draws an added object, for each corner it is asked for.

``python train/corner_probe.py --checkpoint DIR --data MANIFEST [--n 12]``: each of the first ``n``
"add" examples of a shapes manifest is edited four times, its instruction naming each corner in
turn; for every asked corner that is empty in the source, the quadrants the output changed
(:func:`changed_quadrants`) are counted. Printed: the 4 x 4 table (rows: the corner asked; columns:
the quadrants changed), how often exactly the asked quadrant changed, and how often the four
outputs of an example were the same drawing (no quadrant differs between them). A model that
reads the corner has a diagonal table; one that does not draws in the same place whatever is asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mgie.data.shapes import CORNERS  # noqa: E402

PIXEL_TOL = 0.2  # a pixel changed: some channel moved by more than this, in [0, 1]
AREA_TOL = 0.03  # a quadrant changed: more than this share of its pixels changed


def changed_quadrants(source: Image.Image, output: Image.Image) -> list[bool]:
    """Which quadrants (top left, top right, bottom left, bottom right, as ``CORNERS``) of
    ``output`` differ from ``source``: more than ``AREA_TOL`` of their pixels by ``PIXEL_TOL``."""
    s = np.asarray(source.convert("RGB"), dtype=np.float64) / 255  # (H, W, 3)
    o = np.asarray(output.convert("RGB").resize(source.size), dtype=np.float64) / 255
    changed = np.abs(o - s).max(-1) > PIXEL_TOL  # (H, W)
    h, w = changed.shape
    halves = [(slice(0, h // 2), slice(0, w // 2)), (slice(0, h // 2), slice(w // 2, w)),
              (slice(h // 2, h), slice(0, w // 2)), (slice(h // 2, h), slice(w // 2, w))]  # fmt: skip
    return [bool(changed[ys, xs].mean() > AREA_TOL) for ys, xs in halves]


def main(argv: list[str] | None = None) -> int:
    """Print the asked-corner x changed-quadrant table of a checkpoint's adds."""
    from mgie.pipeline import MGIEPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a shapes manifest folder")
    p.add_argument("--n", type=int, default=12, help="add examples to probe")
    args = p.parse_args(argv)
    pipe = MGIEPipeline.from_pretrained(args.checkpoint)
    rows = [json.loads(line) for line in open(Path(args.data) / "manifest.jsonl")]
    rows = [r for r in rows if r.get("edit") == "add"][: args.n]
    table, right, asked, same = np.zeros((4, 4), dtype=int), 0, 0, 0
    for r in rows:
        src = Image.open(Path(args.data) / r["source"]).convert("RGB")
        stem = r["instruction"].rsplit(" in the ", 1)[0]  # "add a red square"
        outs = pipe([src] * 4, [f"{stem} in the {c}" for c in CORNERS], progress=False).images
        same += all(not any(changed_quadrants(outs[0], o)) for o in outs[1:])
        occupied = {o["cell"] for o in r["scene"]["objects"]}
        for c, out in enumerate(outs):
            if c in occupied:
                continue
            q = changed_quadrants(src, out)
            table[c] += q
            asked += 1
            right += q == [k == c for k in range(4)]
    print("asked \\ changed: " + " | ".join(CORNERS))
    for c, name in enumerate(CORNERS):
        print(f"{name:>12}: " + " | ".join(f"{v:>5d}" for v in table[c]))
    print(f"only the asked quadrant changed: {right} of {asked}; "
          f"the same drawing for all four corners: {same} of {len(rows)} examples")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
