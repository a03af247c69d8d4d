import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgie.edit import main

from .conftest import fixture_path, random_image

FAST = ["--steps", "2", "--max-side", "64", "--quiet"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_end_to_end_on_a_real_jpeg_subprocess(tmp_path):
    """The README's main command, as a user runs it, on a real photo."""
    src = fixture_path("photos", "1.jpg")
    out = tmp_path / "night.png"
    before = digest(src)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgie.edit",
            "--image",
            str(src),
            "--instruction",
            "turn the day into night",
            "--out",
            str(out),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "untrained" not in proc.stderr and "Traceback" not in proc.stderr  # the embedded mgie-shapes
    assert proc.stdout.count("\n") == 1  # the expressive instruction, one line
    with Image.open(out) as im, Image.open(src) as orig:
        assert im.size == orig.size and im.mode == "RGB"
    assert digest(src) == before


def test_default_output_is_beside_the_input_and_never_overwrites(tmp_path, capsys):
    src = tmp_path / "photo.jpg"
    random_image(40, 30).save(src)
    before = digest(src)
    assert run_cli(capsys, "--image", str(src), "--instruction", "make it dark", *FAST)[0] == 0
    assert run_cli(capsys, "--image", str(src), "--instruction", "make it dark", *FAST)[0] == 0
    assert (tmp_path / "photo_mgie.png").exists() and (tmp_path / "photo_mgie-1.png").exists()
    assert digest(src) == before


def test_keep_unchanged_one_gives_the_input_back_pixel_for_pixel(tmp_path, capsys):
    """--keep-unchanged reaches the pipeline: with 1 no cell counts as changed."""
    src = tmp_path / "photo.png"
    random_image(40, 32).save(src)
    out = tmp_path / "out.png"
    argv = ["--image", str(src), "--instruction", "make it dark", "--out", str(out), *FAST]
    assert run_cli(capsys, *argv, "--keep-unchanged", "1")[0] == 0
    with Image.open(out) as im, Image.open(src) as orig:
        assert np.array_equal(np.asarray(im), np.asarray(orig))
    out.unlink()
    assert run_cli(capsys, *argv, "--keep-unchanged", "0")[0] == 0
    with Image.open(out) as im, Image.open(src) as orig:
        assert not np.array_equal(np.asarray(im), np.asarray(orig))


def _modes(tmp_path: Path) -> dict[str, Path]:
    rgb = random_image(36, 28, seed=4)
    files = {}
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(36, dtype=np.uint8) * 7, (28, 1))))
    files["RGBA"] = tmp_path / "rgba.png"
    rgba.save(files["RGBA"])
    files["P"] = tmp_path / "p.png"
    rgb.convert("P").save(files["P"])
    files["L"] = tmp_path / "l.png"
    rgb.convert("L").save(files["L"])
    files["CMYK"] = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(files["CMYK"])
    files["I;16"] = tmp_path / "i16.png"
    Image.fromarray(np.arange(36 * 28, dtype=np.uint16).reshape(28, 36) * 60).save(files["I;16"])
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    files["EXIF"] = tmp_path / "exif.jpg"
    rgb.save(files["EXIF"], exif=exif)
    return files


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "EXIF"])
def test_any_pil_mode_and_exif_orientation(tmp_path, capsys, mode):
    src = _modes(tmp_path)[mode]
    out = tmp_path / f"out_{mode.replace(';', '')}.png"
    code, _, err = run_cli(
        capsys, "--image", str(src), "--instruction", "make it dark", "--out", str(out), *FAST
    )
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == ((28, 36) if mode == "EXIF" else (36, 28))  # EXIF orientation honoured
        if mode == "RGBA":
            assert im.mode == "RGBA" and np.asarray(im)[0, :, 3].tolist() == [i * 7 for i in range(36)]


def _bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    good = tmp_path / "good.png"
    random_image(32, 32).save(good)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    real = fixture_path("photos", "0.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(real[: len(real) // 2])
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep me")
    empty_dir = tmp_path / "empty_ckpt"
    empty_dir.mkdir()
    ok = ["--instruction", "make it dark"]
    g = ["--image", str(good)]
    return {
        "missing file": ["--image", str(tmp_path / "nope.jpg"), *ok],
        "directory": ["--image", str(tmp_path), *ok],
        "not an image": ["--image", str(text), *ok],
        "truncated": ["--image", str(truncated), *ok],
        "absurd size": ["--image", str(huge), *ok],
        "empty instruction": [*g, "--instruction", ""],
        "blank instruction": [*g, "--instruction", "  \t "],
        "overlong instruction": [*g, "--instruction", "make it dark " * 300],
        "steps 0": [*g, *ok, "--steps", "0"],
        "steps text": [*g, *ok, "--steps", "many"],
        "guidance negative": [*g, *ok, "--guidance", "-1"],
        "image guidance huge": [*g, *ok, "--image-guidance", "1000"],
        "seed negative": [*g, *ok, "--seed", "-3"],
        "max side tiny": [*g, *ok, "--max-side", "4"],
        "keep unchanged above 1": [*g, *ok, "--keep-unchanged", "1.5"],
        "missing checkpoint": [*g, *ok, "--checkpoint", str(tmp_path / "no_ckpt")],
        "not a checkpoint": [*g, *ok, "--checkpoint", str(empty_dir)],
        "out is input": [*g, *ok, "--out", str(good)],
        "out exists": [*g, *ok, "--out", str(existing)],
        "bad extension": [*g, *ok, "--out", str(tmp_path / "x.gifx")],
        "missing out folder": [*g, *ok, "--out", str(tmp_path / "no" / "x.png")],
        "no cuda": [*g, *ok, "--device", "cuda"],
        "bad scheduler": [*g, *ok, "--scheduler", "warp", *FAST],
        "missing instruction flag": [*g],
    }


BAD = [
    "missing file",
    "directory",
    "not an image",
    "truncated",
    "absurd size",
    "empty instruction",
    "blank instruction",
    "overlong instruction",
    "steps 0",
    "steps text",
    "guidance negative",
    "image guidance huge",
    "seed negative",
    "max side tiny",
    "keep unchanged above 1",
    "missing checkpoint",
    "not a checkpoint",
    "out is input",
    "out exists",
    "bad extension",
    "missing out folder",
    "no cuda",
    "bad scheduler",
    "missing instruction flag",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_error_nonzero_exit(tmp_path, capsys, case):
    if case == "no cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    argv = _bad_inputs(tmp_path)[case]
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    try:
        code, out, err = run_cli(capsys, *argv)
    except SystemExit as e:  # argparse errors exit through SystemExit
        code, (out, err) = e.code, capsys.readouterr()
    assert code == 2
    assert error_line(err).startswith("error: ")
    assert out == ""
    after = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert after == before  # nothing written, nothing lost


def test_set_overrides_the_checkpoint_config_4bit(tmp_path, capsys, tiny_cfg, tokenizer):
    """`--set model.quantization.bits=4` loads the LLM in 4 bits (bitsandbytes) and still edits."""
    pytest.importorskip("bitsandbytes")
    from .conftest import make_model

    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    img = tmp_path / "in.png"
    random_image(32, 32).save(img)
    code, out, err = run_cli(
        capsys,
        "--image",
        str(img),
        "--instruction",
        "make it dark",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--set",
        "model.quantization.bits=4",
        "--set",
        "model.quantization.compute_dtype=float32",
        "--out",
        str(tmp_path / "o.png"),
        *FAST,
    )
    assert code == 0, err
    assert (tmp_path / "o.png").is_file()
    code, _, err = run_cli(
        capsys,
        "--image",
        str(img),
        "--instruction",
        "x",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--set",
        "model.nope=1",
        *FAST,
    )
    assert code == 2 and "unknown config key" in error_line(err)


def test_without_the_embedded_model_the_untrained_tiny_preset_runs_and_says_so(tmp_path, capsys, monkeypatch):
    import mgie.edit

    monkeypatch.setattr(mgie.edit, "EMBEDDED", tmp_path / "absent")
    src = tmp_path / "in.png"
    random_image(40, 30).save(src)
    code, out, err = run_cli(capsys, "--image", str(src), "--instruction", "make it dark", *FAST)
    assert code == 0 and "untrained" in err and (tmp_path / "in_mgie.png").is_file()
