import json

from mgie.data import shapes
from mgie.evaluate import main
from mgie.metrics import CHECKS

from .conftest import make_model
from .test_metrics import write_lpips_weights


def test_evaluate_writes_report_and_grid_and_resumes(tmp_path, tiny_cfg, tokenizer, capsys):
    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    assert (
        shapes.main(
            ["--out", str(tmp_path / "world"), "--n", "6", "--seed", "1", "--split", "test", "--quiet"]
        )
        == 0
    )
    args = [
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--data",
        str(tmp_path / "world"),
        "--out",
        str(tmp_path / "report.json"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--quiet",
        "--grid",
        "4",
    ]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 6
    assert set(report["metrics"]) >= {"l1", "l2", "psnr", "ssim", "lpips", "clip_i", "clip_t", "dino"}
    assert report["metrics"]["clip_i"].startswith("unavailable")
    assert report["metrics"]["lpips"] == "unavailable: pass --lpips PATH"
    assert 0 <= report["metrics"]["ssim"] <= 1 and report["metrics"]["l1"] > 0
    success = report["edit_success"]
    assert success["all"]["n"] == 6 and sum(v["n"] for k, v in success.items() if k.startswith("kind/")) == 6
    assert success["all"]["rate"] == 0.0  # an untrained model edits nothing right
    assert report["row_success"] == {f"test_{i:06d}": False for i in range(6)}
    anatomy = report["edit_anatomy"]
    assert {k: v["n"] for k, v in anatomy.items()} == {
        k: v["n"] for k, v in success.items() if "split" not in k
    }
    assert all(set(v) == {"n", "moved", "reach", "spill"} for v in anatomy.values())
    assert anatomy["all"]["reach"] < 0.65  # nothing reaches the targets
    checks = report["edit_checks"]
    assert {k: v["n"] for k, v in checks.items()} == {k: v["n"] for k, v in anatomy.items()}
    assert all(set(v) == {"n", *CHECKS} and all(0 <= v[c] <= 1 for c in CHECKS) for v in checks.values())
    assert min(checks["all"][c] for c in CHECKS) < 1  # an edit that fails fails some check
    assert all(success[k]["rate"] <= min(v[c] for c in CHECKS) for k, v in checks.items())
    assert report["expressive"]["n"] == 6 and 0 <= report["expressive"]["token_f1"] <= 1
    assert (tmp_path / "report.png").is_file()
    outputs = tmp_path / "report_outputs"
    stamps = {p.name: p.stat().st_mtime_ns for p in outputs.glob("*.png")}
    assert len(stamps) == 6
    write_lpips_weights(tmp_path / "lpips")
    assert main([*args, "--lpips", str(tmp_path / "lpips")]) == 0  # resumes: nothing is edited again
    assert {p.name: p.stat().st_mtime_ns for p in outputs.glob("*.png")} == stamps
    lpips = json.loads((tmp_path / "report.json").read_text())["metrics"]["lpips"]
    assert isinstance(lpips, float) and lpips > 0

    from train.record_metrics import main as record

    assert record(["--model", str(tmp_path / "ckpt"), f"ci_subset={tmp_path / 'report.json'}"]) == 0
    kept = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["ci_subset"]
    assert kept["n"] == 6 and kept["edit_success"] == success["all"]["rate"] and kept["split"] == "test"
    assert kept["expressive_exact"] == report["expressive"]["exact_match"] and "ssim" in kept["metrics"]
    assert kept["metrics"]["lpips"] == lpips
    assert record(["--model", str(tmp_path / "ckpt"), f"ci_heldout={tmp_path / 'report.json'}"]) == 0
    both = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert (both["ci_heldout"]["seed"], both["ci_heldout"]["split"]) == (2, "heldout_paraphrase")
    assert both["ci_subset"] == kept  # the earlier entry is kept
    assert record(["--model", str(tmp_path / "ckpt"), "oops"]) == 2

    # a cached output is reused only for the row it was made from, by the settings it was made with
    capsys.readouterr()
    assert main([*args[:-6], "3", *args[-5:]]) == 2  # --steps 3 instead of 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (steps)" in err  # --quiet: the error line alone
    config = tmp_path / "ckpt" / "config.yaml"  # the same flags, but the checkpoint's default changed
    text = config.read_text()
    config.write_text(text.replace("image_guidance: 1.5", "image_guidance: 1.25", 1))
    assert main(args) == 2 and "other settings (image_guidance)" in capsys.readouterr().err
    config.write_text(text)
    manifest = tmp_path / "world" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["instruction"] = "make it look like night"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(args) == 0
    now = {p.name: p.stat().st_mtime_ns for p in outputs.glob("*.png")}
    assert [n for n in now if now[n] != stamps[n]] == [f"{rows[1]['id']}.png"]


def test_evaluate_bad_input(tmp_path, capsys):
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path),
                "--data",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: manifest not found")


def test_vae_oracle_scores_reconstructions_of_the_targets(tmp_path, tiny_cfg, tokenizer):
    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    assert (
        shapes.main(
            ["--out", str(tmp_path / "world"), "--n", "3", "--seed", "2", "--split", "test", "--quiet"]
        )
        == 0
    )
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--data",
                str(tmp_path / "world"),
                "--out",
                str(tmp_path / "oracle.json"),
                "--oracle",
                "vae",
                "--quiet",
                "--grid",
                "0",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "oracle.json").read_text())
    assert report["expressive"]["exact_match"] == 1.0  # the oracle reports the true texts
    assert report["n"] == 3 and "edit_success" in report


def test_a_model_that_writes_no_text_has_no_expressive_scores(tmp_path, tiny_cfg, tokenizer, capsys):
    """The IP2P baseline writes no expressive instruction: its scores are unavailable, not zero."""
    from mgie.config import from_dict, to_dict
    from train.compare import main as compare
    from train.record_metrics import main as record

    d = to_dict(tiny_cfg)
    d["model"]["mllm"].update(use_image=False, expressive=False)
    make_model(from_dict(d), tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    assert (
        shapes.main(
            ["--out", str(tmp_path / "world"), "--n", "2", "--seed", "3", "--split", "test", "--quiet"]
        )
        == 0
    )
    report_path = tmp_path / "ip2p.json"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "world"), "--out", str(report_path),
            "--steps", "1", "--quiet", "--grid", "0"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["expressive"] == "unavailable: the model writes no expressive instruction"
    assert record(["--model", str(tmp_path / "ckpt"), f"ip2p={report_path}"]) == 0
    assert "expressive_exact" not in json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["ip2p"]
    capsys.readouterr()
    assert compare([f"IP2P={report_path}"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split(" | ")
    assert row[0] == "| IP2P" and row[5:7] == ["-", "-"]  # expressive exact, token F1
