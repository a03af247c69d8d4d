"""``python -m mgie.evaluate --checkpoint DIR --data MANIFEST --out REPORT.json``: edit and score.

Batch-edits a manifest and scores the outputs against its targets.

Outputs are cached beside the report (``REPORT_outputs/<id>.png`` and ``expressive.jsonl``), so
an interrupted run resumes; a cached output is reused only for the row it was made from (same
instruction, source and target) and only by the settings it was made with (checkpoint path,
overrides and the resolved inference settings: ``settings.json``; others are refused with an error). The report holds the pixel metrics (L1, L2, PSNR, SSIM), CLIP-I /
CLIP-T / DINO / LPIPS when ``--clip`` / ``--dino`` / ``--lpips`` weights are given (else
"unavailable"; LPIPS is AlexNet v0.1, a raw distance, lower is better), and, for a shapes-world
manifest, the exact edit success per kind, edit and split, the median anatomy of the edits
per kind and edit (``mgie.metrics.edit_anatomy``: how much the output changed the region the
edit should change, how far towards the target, and how much it changed elsewhere), and the
expressive instruction's exact-match rate and token F1, and the pass rate of each check
that makes up edit success (``mgie.metrics.edit_checks``: kept, no_stray, reach, near, closer), so
that a failing edit says which way it fails. A PNG grid shows source | target |
output | expressive text for the first rows.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mgie.cli import Parser, ranged, run_command


def _rows(manifest: Path) -> dict[str, dict]:
    """Raw manifest rows by id (extra fields such as ``kind`` and ``edit`` kept)."""
    from mgie.data.formats import read_jsonl

    records = read_jsonl(manifest)
    path = manifest / "manifest.jsonl" if manifest.is_dir() else manifest
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r.id: {**row, "record": r} for r, row in zip(records, raw)}


def _row_key(row: dict) -> str:
    """What a cached output was made from: the record's instruction, source and target."""
    r = row["record"]
    return json.dumps([r.instruction, repr(r.source), repr(r.target)])


def _cached(out_dir: Path, rows: dict[str, dict]) -> dict[str, str]:
    """``{id: expressive}`` of the cached outputs that were made from the rows as they are now
    (the last line of an id wins; an output of an edited row is made again)."""
    f = out_dir / "expressive.jsonl"
    if not f.is_file():
        return {}
    done = {}
    for line in f.read_text().splitlines():
        item = json.loads(line)
        i = item["id"]
        fresh = i in rows and item.get("key") == _row_key(rows[i])
        if fresh and (out_dir / f"{_file_id(i)}.png").is_file():
            done[i] = item["expressive"]
        else:
            done.pop(i, None)
    return done


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume into ``out_dir`` if its outputs were made with other settings (another
    checkpoint path or override, or other resolved inference settings: steps, guidance, seed ...);
    record the settings of a new folder. The checkpoint's weights are not compared."""
    f = out_dir / "settings.json"
    if f.is_file():
        before = json.loads(f.read_text())
        if before != settings:
            keys = sorted(set(before) | set(settings))
            changed = ", ".join(k for k in keys if before.get(k) != settings.get(k))
            raise ValueError(f"{out_dir} holds outputs made with other settings ({changed}): "
                             "pass another --out or delete that folder")  # fmt: skip
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=2))


def _file_id(record_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in record_id)


def pipeline_editor(pipe, steps, seed):
    """Records -> (edited images, expressive texts) with an :class:`MGIEPipeline`."""

    def edit(recs):
        result = pipe([r.source.load() for r in recs], [r.instruction for r in recs], steps=steps, seed=seed,
                      progress=False)  # fmt: skip
        return result.images, result.expressive

    return edit


@torch.no_grad()
def vae_oracle(vae):
    """Records -> (the VAE's reconstruction of each *target*, the true expressive text): the best
    any UNet on this VAE can do, to calibrate a model's edit success against."""
    from mgie.diffusion import decode, encode_source
    from mgie.images import to_pil, to_tensor

    def edit(recs):
        targets = [r.target.load() for r in recs]
        latents = encode_source(vae, to_tensor(targets)) * vae.config.scaling_factor
        return to_pil(decode(vae, latents)), [r.expressive or "" for r in recs]

    return edit


def edit_all(editor, rows: dict[str, dict], out_dir: Path, batch: int, progress: bool) -> dict[str, str]:
    """Edit every row not cached yet with ``editor``; returns ``{id: expressive}`` for all rows."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    done = _cached(out_dir, rows)
    todo = [i for i in rows if i not in done]
    with open(out_dir / "expressive.jsonl", "a") as log, tqdm(total=len(rows), initial=len(done),
                                                             desc="edit", disable=not progress) as bar:  # fmt: skip
        for k in range(0, len(todo), batch):
            ids = todo[k : k + batch]
            images, texts = editor([rows[i]["record"] for i in ids])
            for i, img, text in zip(ids, images, texts):
                tmp = out_dir / f".{_file_id(i)}.png"
                img.save(tmp, format="PNG")
                os.replace(tmp, out_dir / f"{_file_id(i)}.png")
                log.write(json.dumps({"id": i, "expressive": text, "key": _row_key(rows[i])}) + "\n")
                done[i] = text
            log.flush()
            bar.update(len(ids))
    return done


def score(
    rows: dict[str, dict],
    out_dir: Path,
    expressive: dict[str, str],
    clip: str | None,
    dino: str | None,
    lpips: str | None,
    writes_text: bool = True,
) -> dict:
    """The report: averages of the pixel metrics, feature scores, shapes-world checks.

    ``writes_text=False`` (a model that writes no expressive instruction, the IP2P baseline)
    reports the expressive scores as unavailable rather than as zero.
    """
    from mgie.metrics import (
        CHECKS,
        clip_scores,
        dino_score,
        edit_anatomy,
        edit_checks,
        exact_match,
        lpips_score,
        pixel_metrics,
        token_f1,
    )

    sums: dict[str, float] = defaultdict(float)
    success: dict[str, list[bool]] = defaultdict(list)
    anatomy: dict[str, list[dict[str, float]]] = defaultdict(list)
    checks: dict[str, list[dict[str, bool]]] = defaultdict(list)
    exact, f1 = [], []
    outputs, targets, captions = [], [], []
    row_success: dict[str, bool] = {}  # per example, for paired comparisons (train/compare.py)
    for i, row in rows.items():
        rec = row["record"]
        src, tgt = rec.source.load(), rec.target.load()
        out = Image.open(out_dir / f"{_file_id(i)}.png").convert("RGB")
        for k, v in pixel_metrics(out, tgt).items():
            sums[k] += v if math.isfinite(v) else 100.0  # PSNR of a perfect match counted as 100 dB
        outputs.append(out)
        targets.append(tgt)
        captions.append(row.get("output_caption") or "")
        if "kind" in row:
            keys = ("all", f"kind/{row['kind']}", f"edit/{row['edit']}")
            split = f"split/{row.get('split', '?')}"
            passed, parts = edit_checks(src, tgt, out), edit_anatomy(src, tgt, out)
            ok = all(passed.values())  # = mgie.metrics.edit_success
            row_success[i] = ok
            for key in (*keys, split, f"{split}/kind/{row['kind']}"):
                success[key].append(ok)
            for key in keys:
                anatomy[key].append(parts)
                checks[key].append(passed)
        if rec.expressive and writes_text:
            exact.append(exact_match(expressive[i], rec.expressive))
            f1.append(token_f1(expressive[i], rec.expressive))
    n = len(rows)
    report: dict = {"n": n, "metrics": {k: v / n for k, v in sums.items()}}
    report["metrics"]["lpips"] = (
        lpips_score(lpips, outputs, targets) if lpips else "unavailable: pass --lpips PATH"
    )
    if clip:
        report["metrics"].update(clip_scores(clip, outputs, targets, captions if all(captions) else None))
    else:
        report["metrics"]["clip_i"] = report["metrics"]["clip_t"] = "unavailable: pass --clip PATH"
    report["metrics"]["dino"] = (
        dino_score(dino, outputs, targets) if dino else "unavailable: pass --dino PATH"
    )
    if success:
        report["edit_success"] = {
            k: {"rate": sum(v) / len(v), "n": len(v)} for k, v in sorted(success.items())
        }
        report["edit_anatomy"] = {k: _medians(v) for k, v in sorted(anatomy.items())}
        report["edit_checks"] = {
            k: {"n": len(v), **{c: sum(p[c] for p in v) / len(v) for c in CHECKS}}
            for k, v in sorted(checks.items())
        }
        report["row_success"] = row_success
    if not writes_text:
        report["expressive"] = "unavailable: the model writes no expressive instruction"
    elif exact:
        report["expressive"] = {
            "exact_match": sum(exact) / len(exact),
            "token_f1": sum(f1) / len(f1),
            "n": len(exact),
        }
    return report


def _medians(parts: list[dict[str, float]]) -> dict:
    """Median of each :func:`mgie.metrics.edit_anatomy` field over examples (NaNs left out; None if all)."""
    out: dict = {"n": len(parts)}
    for name in parts[0]:
        vals = [p[name] for p in parts if math.isfinite(p[name])]
        out[name] = float(np.median(vals)) if vals else None
    return out


def grid(rows: dict[str, dict], out_dir: Path, expressive: dict[str, str], path: Path, n: int) -> None:
    """source | target | output | expressive text, one row per example, as a PNG."""
    items = list(rows.items())[:n]
    cell, text_w = 128, 360
    img = Image.new("RGB", (3 * cell + text_w, cell * len(items)), "white")
    draw = ImageDraw.Draw(img)
    for r, (i, row) in enumerate(items):
        rec = row["record"]
        out = Image.open(out_dir / f"{_file_id(i)}.png")
        for c, pic in enumerate((rec.source.load(), rec.target.load(), out)):
            img.paste(pic.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (c * cell, r * cell))
        lines = [f"ins: {rec.instruction}", f"out: {expressive[i]}", f"gt:  {rec.expressive or '-'}"]
        draw.multiline_text(
            (3 * cell + 6, r * cell + 6), "\n".join(_wrap(s, 52) for s in lines), fill="black"
        )
    img.save(path)


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = "    " + w
        else:
            cur = f"{cur} {w}".strip() if cur else w
    return "\n".join([*lines, cur])


def build_parser() -> Parser:
    """The command-line interface."""
    p = Parser(prog="python -m mgie.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="MGIE checkpoint folder")
    p.add_argument("--data", required=True, help="JSONL manifest (or a folder with manifest.jsonl)")
    p.add_argument("--out", required=True, help="report file (.json); outputs go to <report>_outputs/")
    p.add_argument("--steps", type=ranged(int, 1, 1000), help="denoising steps (default: the checkpoint's)")
    p.add_argument("--seed", type=ranged(int, 0, 2**63 - 1), help="seed (default: the checkpoint's)")
    p.add_argument("--batch-size", type=ranged(int, 1, 4096), default=16)
    p.add_argument("--limit", type=ranged(int, 1, 10**9), help="evaluate the first N rows only")
    p.add_argument("--grid", type=ranged(int, 0, 1000), default=16, help="rows in the PNG grid")
    p.add_argument("--clip", help="CLIP folder (e.g. openai/clip-vit-base-patch32) for CLIP-I/CLIP-T")
    p.add_argument("--dino", help="DINO ViT folder (e.g. facebook/dino-vits16) for DINO")
    p.add_argument("--lpips", help="folder with torchvision's AlexNet weights and LPIPS v0.1 alex.pth")
    p.add_argument("--oracle", choices=["vae"], help="score the VAE's reconstructions of the targets instead "
                   "(the ceiling of any model on this VAE)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the checkpoint's config, e.g. inference.guidance=2")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    """Evaluate and write the report, the grid and the cached outputs."""

    from mgie.config import to_dict
    from mgie.pipeline import MGIEPipeline
    from mgie.utils import resolve_device

    report_path = Path(args.out)
    if report_path.suffix != ".json":
        raise ValueError(f"--out must be a .json file, got {report_path}")
    data = Path(args.data)
    if not data.exists():
        raise ValueError(f"manifest not found: {data}")
    rows = _rows(data)
    if args.limit:
        rows = dict(list(rows.items())[: args.limit])
    device = resolve_device(args.device)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    pipe = MGIEPipeline.from_pretrained(args.checkpoint, str(device), torch.float32, args.set)
    out_dir = report_path.with_name(report_path.stem + "_outputs")
    inference = {**to_dict(pipe.cfg.inference), "steps": args.steps or pipe.cfg.inference.steps}
    if args.seed is not None:
        inference["seed"] = args.seed
    # the resolved settings, not only the flags: a checkpoint whose config changed is caught too
    check_settings(out_dir, {"checkpoint": str(Path(args.checkpoint).resolve()), "oracle": args.oracle,
                             "overrides": list(args.set), **inference})  # fmt: skip
    if args.oracle == "vae":
        editor = vae_oracle(pipe.model.vae)
    else:
        editor = pipeline_editor(pipe, args.steps, args.seed)
    expressive = edit_all(editor, rows, out_dir, args.batch_size, not args.quiet)
    writes_text = args.oracle == "vae" or pipe.cfg.model.mllm.expressive
    report = score(rows, out_dir, expressive, args.clip, args.dino, args.lpips, writes_text)
    report.update(
        checkpoint=str(args.checkpoint),
        data=str(data),
        steps=args.steps or pipe.cfg.inference.steps,
        inference=to_dict(pipe.cfg.inference),
        overrides=args.set,
    )
    if args.grid:
        grid(rows, out_dir, expressive, report_path.with_suffix(".png"), args.grid)
    tmp = report_path.with_name(f".{report_path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, report_path)
    print(json.dumps({k: report[k] for k in report if k in ("n", "metrics", "expressive")}, indent=2))
    if "edit_success" in report:
        print("edit success: " + ", ".join(f"{k} {v['rate']:.3f}" for k, v in report["edit_success"].items()
                                           if k == "all" or k.startswith("kind/")), file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mgie.evaluate``."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
