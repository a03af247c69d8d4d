"""``python -m mgie.benchmark``: speed and memory of MGIE, printed as a Markdown table.

    python -m mgie.benchmark [--checkpoint DIR] [--device cpu] [--threads N] [--repeat 3]
                             [--world-n 2000] [--json PATH] [--skip-cli]

Rows (``| measure | value | unit | notes |``; timings are the median of ``--repeat`` runs, min-max
in the notes):

- ``cli edit, 128 px``: wall seconds of the user command ``python -m mgie.edit --image IMG
  --instruction "make the odd one out blue" --out OUT --quiet`` run as a subprocess on a 128 x 128
  shapes-world scene (target < 10 s on the 2-core CPU machine), and ``peak RSS, cli (MB)``;
- ``load``: seconds of loading the checkpoint in-process;
- ``edit, batch 1``: seconds per edit after a warm-up, split into ``expressive text + [IMG]
  states`` (:meth:`MGIEPipeline.describe`) and ``diffusion`` (the rest); ``edit, batch 16``:
  images/s of one call on 16 different scenes;
- ``peak RSS, in-process (MB)`` after the above;
- ``world generation``: examples/s of generating and rendering (source and target) shapes-world
  examples, without writing them.

Without ``--checkpoint`` it measures what ``python -m mgie.edit`` uses without one. Tests check
behaviour; speed and memory targets live here.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from mgie.cli import Parser, ranged, run_command

INSTRUCTION = "make the odd one out blue"
SEED = 0
CLI_SIDE = 128
BATCH = 16
CLI_TARGET = "target < 10 s"
MAXRSS_PER_MB = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


@dataclass
class Row:
    """One line of the table."""

    measure: str
    value: float
    unit: str
    notes: str = ""


# ----------------------------------------------------------------------------- timing


def seconds(fn: Callable[[], object], device=None) -> float:
    """Wall seconds of ``fn()``, waiting for queued CUDA work to finish."""
    import torch

    t0 = time.perf_counter()
    fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def spread(values: list[float]) -> str:
    """``min-max a-b (n=N)`` for the notes column."""
    return f"min-max {fmt(min(values))}-{fmt(max(values))} (n={len(values)})"


def fmt(value: float) -> str:
    """A number with four significant digits (whole numbers from 10 000 up)."""
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def timing_row(measure: str, times: list[float], note: str = "") -> Row:
    """A seconds row: the median of ``times``, their spread in the notes."""
    return Row(measure, statistics.median(times), "s", "; ".join(filter(None, [note, spread(times)])))


def rate_row(measure: str, count: int, times: list[float], unit: str, note: str) -> Row:
    """A per-second row: ``count`` items per median time, the spread of the rates in the notes."""
    rates = [count / t for t in times]
    return Row(measure, count / statistics.median(times), unit, f"{note}; {spread(rates)}")


def peak_rss_mb(who: int) -> float:
    """Peak resident memory in MB of ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN``."""
    return resource.getrusage(who).ru_maxrss / MAXRSS_PER_MB


# ----------------------------------------------------------------------------- inputs


def scene(side: int = CLI_SIDE) -> Image.Image:
    """A shapes-world test scene (64 px) scaled to ``side`` x ``side`` with NEAREST."""
    from mgie.data import shapes

    example = shapes.generate(1, SEED, "test")[0]
    return shapes.render(example.source).resize((side, side), Image.Resampling.NEAREST)


def scenes(n: int = BATCH) -> tuple[list[Image.Image], list[str]]:
    """``n`` different shapes-world test sources (64 px) and their instructions."""
    from mgie.data import shapes

    examples = shapes.generate(n, SEED, "test")
    return [shapes.render(e.source) for e in examples], [e.instruction for e in examples]


def load_pipeline(checkpoint: str | None, device):
    """The pipeline on ``device``: ``checkpoint``, or what ``python -m mgie.edit`` uses without one."""
    import torch

    from mgie.edit import load_default_model
    from mgie.pipeline import MGIEPipeline

    if checkpoint:
        return MGIEPipeline.from_pretrained(checkpoint, str(device))
    return MGIEPipeline(load_default_model(torch.float32).to(device))


def checkpoint_label(checkpoint: str | None) -> str:
    """The checkpoint named in the header."""
    from mgie.edit import EMBEDDED

    if checkpoint:
        return str(checkpoint)
    if (EMBEDDED / "config.yaml").is_file():
        return f"{EMBEDDED} (built-in)"
    return "none: the untrained tiny preset (no built-in model installed)"


# ----------------------------------------------------------------------------- measures


def cli_rows(args, device, workdir: Path) -> list[Row]:
    """Seconds of the whole ``python -m mgie.edit`` command, and the child's peak RSS."""
    image = workdir / "scene.png"
    scene().save(image)
    cmd = [sys.executable, "-m", "mgie.edit", "--image", str(image), "--instruction", INSTRUCTION,
           "--quiet", "--device", str(device)]  # fmt: skip
    if args.checkpoint:
        cmd += ["--checkpoint", str(Path(args.checkpoint).resolve())]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    times = [
        seconds(lambda i=i: run_cli(cmd + ["--out", str(workdir / f"out_{i}.png")], workdir, env))
        for i in range(args.repeat)
    ]
    note = f"subprocess, {CLI_SIDE} px scene, imports + load + edit + save; {CLI_TARGET}"
    return [
        timing_row(f"cli edit, {CLI_SIDE} px", times, note),
        Row("peak RSS, cli (MB)", peak_rss_mb(resource.RUSAGE_CHILDREN), "MB", "max over the cli runs"),
    ]


def run_cli(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run one cli edit; ``ValueError`` with its last stderr line unless it exits 0."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise ValueError(f"the cli edit exited {proc.returncode}: {lines[-1] if lines else 'no stderr'}")


def load_row(args, device) -> tuple[object, Row]:
    """The pipeline, and the seconds its loading took (the last load is kept)."""
    pipe, times = None, []
    for _ in range(args.repeat):
        pipe = None  # free the previous copy first
        t0 = time.perf_counter()
        pipe = load_pipeline(args.checkpoint, device)
        times.append(time.perf_counter() - t0)
    return pipe, timing_row("load", times, "in-process, float32")


def edit_rows(pipe, repeat: int, device) -> list[Row]:
    """Seconds per single-image edit and its two halves, after one warm-up call."""
    img = [scene()]
    pipe(img, [INSTRUCTION], progress=False)  # warm-up
    describe, total = [], []
    for _ in range(repeat):
        describe.append(seconds(lambda: pipe.describe(img, [INSTRUCTION]), device))
        total.append(seconds(lambda: pipe(img, [INSTRUCTION], progress=False), device))
    diffusion = [t - d for t, d in zip(total, describe)]
    return [
        timing_row("edit, batch 1", total, f"{CLI_SIDE} px input, after 1 warm-up"),
        timing_row("expressive text + [IMG] states", describe, "pipe.describe"),
        timing_row("diffusion", diffusion, "edit minus describe"),
    ]


def batch_row(pipe, repeat: int, device) -> Row:
    """Images/s of one call on ``BATCH`` different scenes."""
    images, instructions = scenes(BATCH)
    times = [seconds(lambda: pipe(images, instructions, progress=False), device) for _ in range(repeat)]
    return rate_row(f"edit, batch {BATCH}", BATCH, times, "images/s", f"{BATCH} different 64 px scenes")


def world_row(n: int, repeat: int) -> Row:
    """Examples/s of generating ``n`` train examples and rendering their source and target."""
    from mgie.data import shapes

    def build() -> None:
        for example in shapes.generate(n, 0, "train"):
            shapes.render(example.source)
            shapes.render(example.target)

    times = [seconds(build) for _ in range(repeat)]
    return rate_row("world generation", n, times, "examples/s", f"n={n}, generate + render both, no disk")


# ----------------------------------------------------------------------------- output


def header(args, pipe) -> str:
    """Device, threads, checkpoint, torch, processor and the inference settings."""
    import torch

    inf = pipe.cfg.inference
    return (
        f"mgie benchmark: device {pipe.model.device}, threads {torch.get_num_threads()}, "
        f"checkpoint {checkpoint_label(args.checkpoint)}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; steps {inf.steps}, scheduler {inf.scheduler}, "
        f"guidance {inf.guidance} (image {inf.image_guidance}), max side {inf.max_side}, repeat {args.repeat}"
    )


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| measure | value | unit | notes |", "| --- | ---: | --- | --- |"]
    lines += [f"| {r.measure} | {fmt(r.value)} | {r.unit} | {r.notes} |" for r in rows]
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    """The rows as a JSON list of dicts, written atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command


def build_parser() -> Parser:
    """The command-line interface."""
    p = Parser(prog="python -m mgie.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="MGIE checkpoint folder (default: what python -m mgie.edit uses)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--threads", type=ranged(int, 1, 4096), help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--repeat", type=ranged(int, 1, 1000), default=3, help="runs per timing (median; default 3)"
    )
    p.add_argument("--world-n", type=ranged(int, 1, 10_000_000), default=2000,
                   help="examples for the world-generation rate (default 2000)")  # fmt: skip
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--skip-cli", action="store_true", help="skip the cli subprocess rows")
    return p


def run(args) -> int:
    """Measure every row, then print the header and the table (and write the JSON)."""
    import torch

    from mgie.utils import resolve_device

    device = resolve_device(args.device)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"folder of --json does not exist: {Path(args.json).parent}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, load = load_row(args, device)  # first: a bad checkpoint fails fast, before the subprocess
    rows = []
    if not args.skip_cli:
        with tempfile.TemporaryDirectory(prefix="mgie-benchmark-") as tmp:
            rows += cli_rows(args, device, Path(tmp))
    rows += [load, *edit_rows(pipe, args.repeat, device), batch_row(pipe, args.repeat, device)]
    rows.append(Row("peak RSS, in-process (MB)", peak_rss_mb(resource.RUSAGE_SELF), "MB", "this process"))
    rows.append(world_row(args.world_n, args.repeat))
    print(header(args, pipe) + "\n\n" + table(rows))
    if args.json:
        write_json(rows, Path(args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mgie.benchmark`` / ``mgie-benchmark``."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
