"""``python -m mgie.benchmark``: every row present and sane; bad input is one error line. No timing checks."""

import copy
import json
import math

from mgie.benchmark import main

from .conftest import make_model

MEASURES = [
    "cli edit, 128 px",
    "peak RSS, cli (MB)",
    "load",
    "edit, batch 1",
    "expressive text + [IMG] states",
    "diffusion",
    "edit, batch 16",
    "peak RSS, in-process (MB)",
    "world generation",
]


def table_rows(out: str) -> dict[str, str]:
    """``{measure: value text}`` of the Markdown table in ``out`` (header and rule skipped)."""
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")][2:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {c[0]: c[1] for c in cells}


def test_benchmark_prints_every_measure_and_writes_json(tmp_path, tiny_cfg, tokenizer, capsys):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.inference.steps = 2  # behaviour, not speed: keep the run short
    make_model(cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    report = tmp_path / "bench.json"
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--repeat", "1", "--world-n", "20", "--json", str(report)]

    code = main(argv)
    out, err = capsys.readouterr()

    assert code == 0, err
    print(out)  # the table, for -s
    header = next(
        ln for ln in out.splitlines() if ln.startswith("mgie benchmark:")
    )  # libraries may log first
    assert "device cpu" in header and "threads" in header and str(tmp_path / "ckpt") in header
    assert "steps 2" in header
    printed = table_rows(out)
    assert list(printed) == MEASURES
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in printed.values())
    rows = json.loads(report.read_text())
    assert [r["measure"] for r in rows] == MEASURES
    assert all(isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0 for r in rows)
    assert "target < 10 s" in rows[0]["notes"]


def test_missing_checkpoint_is_one_error_line_exit_2(tmp_path, capsys):
    code = main(["--checkpoint", str(tmp_path / "absent"), "--repeat", "1", "--world-n", "1"])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error:") and "absent" in lines[0], err
