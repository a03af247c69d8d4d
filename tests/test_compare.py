import json

from train.compare import main


def _report(path, rates, data="data/shapes/test", exact=0.5, rows=None):
    """A report in ``python -m mgie.evaluate``'s layout with the given edit-success rates
    (and per-example successes ``rows``, when given)."""
    es = {k: {"rate": v, "n": 10} for k, v in rates.items()}
    report = {
        "n": 30, "data": data, "steps": 10, "inference": {"guidance": 1.5},
        "metrics": {"l1": 0.1, "ssim": 0.8, "lpips": "unavailable: pass --lpips PATH"},
        "edit_success": es, "expressive": {"exact_match": exact, "token_f1": 0.9, "n": 30},
    }  # fmt: skip
    if rows is not None:
        report["row_success"] = rows
    path.write_text(json.dumps(report))
    return path


def test_compare_puts_each_models_rates_in_its_row_and_column(tmp_path, capsys):
    a = _report(tmp_path / "a.json", {"all": 0.1, "kind/local": 0.2, "kind/global": 0.3, "kind/ambiguous": 0.4,
                                      "edit/night": 0.6, "edit/biggest": 0.7})  # fmt: skip
    b = _report(tmp_path / "b.json", {"all": 0.15, "kind/local": 0.25, "kind/ambiguous": 0.45, "edit/night": 0.65},
                exact=None)  # fmt: skip
    assert main([f"IP2P={a}", f"MGIE={b}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0] == "| model | local | global | ambiguous | all | expressive exact | token F1 | L1 | SSIM |"
    )
    assert lines[2] == "| IP2P | 0.200 | 0.300 | 0.400 | 0.100 | 0.500 | 0.900 | 0.100 | 0.800 |"
    assert lines[3] == "| MGIE | 0.250 | - | 0.450 | 0.150 | - | 0.900 | 0.100 | 0.800 |"
    assert lines[5] == "| edit | IP2P | MGIE |"
    assert "| biggest (n=10) | 0.700 | - |" in lines and "| night (n=10) | 0.600 | 0.650 |" in lines


def test_compare_refuses_reports_of_different_data(tmp_path, capsys):
    a = _report(tmp_path / "a.json", {"all": 0.1})
    b = _report(tmp_path / "b.json", {"all": 0.1}, data="data/shapes/val")
    assert main([f"a={a}", f"b={b}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: b and a differ in 'data'") and err.count("\n") == 1
    assert main(["no-equals-sign"]) == 2
    assert main([f"a={tmp_path / 'missing.json'}"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_paired_comparison_counts_changed_examples_and_mcnemar_z(tmp_path, capsys):
    """A by-hand case: of 30 examples, 12 pass in both, B gains 6 and loses 2 -> z = 4 / sqrt(8)."""
    a_rows = {f"x{i}": i < 14 for i in range(30)}  # 0..13 pass
    b_rows = {f"x{i}": 2 <= i < 20 for i in range(30)}  # loses 0, 1; gains 14..19
    a = _report(tmp_path / "a.json", {"all": 14 / 30}, rows=a_rows)
    b = _report(tmp_path / "b.json", {"all": 18 / 30}, rows=b_rows)
    c = _report(tmp_path / "c.json", {"all": 14 / 30}, rows=a_rows)
    assert main([f"old={a}", f"new={b}", f"same={c}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4] == "| model | vs old | both pass | gained | lost | McNemar z |"
    assert lines[-2] == "| new | 30 examples | 12 | 6 | 2 | +1.41 |"
    assert lines[-1] == "| same | 30 examples | 14 | 0 | 0 | - |"
    d = _report(tmp_path / "d.json", {"all": 0.5}, rows={"y": True})
    assert main([f"old={a}", f"other={d}"]) == 2
    assert "scored different examples" in capsys.readouterr().err
    assert main([f"old={a}", f"norows={_report(tmp_path / 'e.json', {'all': 0.5})}"]) == 0
    assert "McNemar" not in capsys.readouterr().out  # reports of before row_success: no paired table


def test_settings_comparison_allows_other_settings_and_names_them(tmp_path, capsys):
    a = _report(tmp_path / "a.json", {"all": 0.1})
    b = json.loads(_report(tmp_path / "b.json", {"all": 0.2}).read_text())
    b["inference"] = {"guidance": 1.5, "keep_unchanged": 0.1}
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main([f"plain={a}", f"keep={tmp_path / 'b.json'}"]) == 2  # settings differ: refused
    assert "differ in 'inference'" in capsys.readouterr().err
    assert main(["--settings", f"plain={a}", f"keep={tmp_path / 'b.json'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "keep vs plain: keep_unchanged None -> 0.1"
    assert lines[4].startswith("| plain |") and lines[5].startswith("| keep |")
    c = _report(tmp_path / "c.json", {"all": 0.1}, data="data/shapes/val")
    assert main(["--settings", f"plain={a}", f"c={c}"]) == 2  # other data: still refused
