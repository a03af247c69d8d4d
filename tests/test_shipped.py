"""The embedded default model, ``mgie/assets/mgie-shapes``: a real check of the shipped weights."""

import json

import pytest
from safetensors import safe_open

from mgie import edit
from mgie.data import shapes
from mgie.evaluate import main as evaluate
from train.record_metrics import CI_SETS

ASSET = edit.EMBEDDED
MAX_BYTES = 30 * 2**20


def test_shipped_folder_is_small_fp16_safetensors():
    files = [p for p in ASSET.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} >= {"mllm", "unet", "vae", "mgie-shapes"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # nothing to unpickle
    for p in weights:
        with safe_open(p, "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, p


def test_model_card_names_data_config_metrics_and_reproduction():
    card = (ASSET / "README.md").read_text()
    for needle in ("configs/shapes.yaml", "python -m mgie.data.shapes", "edit success", "expressive", "CPU"):
        assert needle in card, needle


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CI_SETS))
def test_shipped_model_reaches_its_recorded_success_on_20_examples(name, tmp_path, capsys):
    """Regenerates the 20 recorded examples (of the test split; of the held-out paraphrases), edits
    them with the shipped weights at their default settings, and compares with the figures
    recorded when the model was packed."""
    rec = json.loads((ASSET / "metrics.json").read_text())[name]
    examples = shapes.generate(rec["n"], rec["seed"], rec["split"])
    manifest = shapes.write(examples, tmp_path / "world", rec["split"], progress=False)
    out = tmp_path / "report.json"
    assert evaluate(["--checkpoint", str(ASSET), "--data", str(manifest), "--out", str(out), "--quiet",
                     "--grid", "0"]) == 0, capsys.readouterr().err  # fmt: skip
    report = json.loads(out.read_text())
    assert report["n"] == rec["n"] == 20
    assert abs(report["edit_success"]["all"]["rate"] - rec["edit_success"]) <= 0.1  # 2 of 20
    assert abs(report["expressive"]["exact_match"] - rec["expressive_exact"]) <= 0.1
