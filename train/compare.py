"""Compare evaluation reports of several models on one manifest, as Markdown tables.

``python train/compare.py NAME=REPORT.json [NAME=REPORT.json ...]`` prints the edit success per
kind (and overall), the expressive instruction's exact match and token F1 and the pixel metrics,
one row per model, then the edit success per edit, one column per model, and, when the reports
list each example's success (``row_success``), a paired comparison of each model with the first:
the examples it now passes and now fails, and McNemar's z. The reports must come
from ``python -m mgie.evaluate`` on the same manifest, the same number of examples and the same
inference settings; otherwise the comparison would not be one, and the command says which differs.
``--settings`` compares inference settings instead (one model, several settings): the settings
may then differ, and a line above the tables names, for each report, those that differ from the
first's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgie.cli import Parser, run_command  # noqa: E402

KINDS = ("local", "global", "ambiguous")
SETTINGS = ("steps", "inference")  # report fields that --settings lets differ
SAME = ("data", "n", *SETTINGS)  # report fields that must agree across models


def load_reports(items: list[str], same: tuple[str, ...] = SAME) -> dict[str, dict]:
    """``{name: report}`` from ``NAME=REPORT.json`` items; ``ValueError`` on a malformed item,
    a report without edit success, or reports that differ in a field of ``same`` (data, size,
    settings)."""
    reports: dict[str, dict] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise ValueError(f"expected NAME=REPORT.json, got {item!r}")
        report = json.loads(Path(path).read_text())
        if "edit_success" not in report:
            raise ValueError(f"{path} has no edit success (not a shapes-world report)")
        reports[name] = report
    first_name, first = next(iter(reports.items()))
    for name, report in reports.items():
        for key in same:
            if report.get(key) != first.get(key):
                raise ValueError(
                    f"{name} and {first_name} differ in {key!r} ({report.get(key)!r} vs {first.get(key)!r})"
                )
    return reports


def _rate(report: dict, key: str) -> str:
    cell = report["edit_success"].get(key)
    return f"{cell['rate']:.3f}" if cell else "-"


def _score(report: dict, key: str) -> str:
    scores = report.get("expressive")
    value = scores.get(key) if isinstance(scores, dict) else None  # a string: unavailable
    return f"{value:.3f}" if isinstance(value, float) else "-"


def kind_table(reports: dict[str, dict]) -> list[str]:
    """One row per model: edit success per kind and overall, expressive scores, L1 and SSIM."""
    head = ["model", *KINDS, "all", "expressive exact", "token F1", "L1", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        m = r["metrics"]
        cells = [name, *(_rate(r, f"kind/{k}") for k in KINDS), _rate(r, "all")]
        cells += [_score(r, "exact_match"), _score(r, "token_f1"), f"{m['l1']:.3f}", f"{m['ssim']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def edit_table(reports: dict[str, dict]) -> list[str]:
    """One row per edit (with its number of examples), one column per model."""
    edits = sorted({k[5:] for r in reports.values() for k in r["edit_success"] if k.startswith("edit/")})
    head = ["edit", *reports]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for edit in edits:
        n = next(
            r["edit_success"][f"edit/{edit}"]["n"]
            for r in reports.values()
            if f"edit/{edit}" in r["edit_success"]
        )
        lines.append(
            f"| {edit} (n={n}) | " + " | ".join(_rate(r, f"edit/{edit}") for r in reports.values()) + " |"
        )
    return lines


def paired_table(reports: dict[str, dict]) -> list[str]:
    """Each model against the first, example by example: how many pass in both, how many the
    model now passes (``gained``) or now fails (``lost``), and McNemar's ``z = (gained - lost) /
    sqrt(gained + lost)`` (|z| > 2: a difference unlikely to be chance). Empty when a report
    lacks ``row_success``; ``ValueError`` when the reports scored different examples."""
    if not all("row_success" in r for r in reports.values()):
        return []
    (first_name, first), *others = reports.items()
    base = first["row_success"]
    head = ["model", f"vs {first_name}", "both pass", "gained", "lost", "McNemar z"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in others:
        rows = r["row_success"]
        if set(rows) != set(base):
            raise ValueError(f"{name} and {first_name} scored different examples")
        both = sum(rows[i] and base[i] for i in base)
        gained = sum(rows[i] and not base[i] for i in base)
        lost = sum(base[i] and not rows[i] for i in base)
        z = f"{(gained - lost) / (gained + lost) ** 0.5:+.2f}" if gained + lost else "-"
        lines.append(f"| {name} | {len(base)} examples | {both} | {gained} | {lost} | {z} |")
    return lines


def settings_lines(reports: dict[str, dict]) -> list[str]:
    """For each report after the first, the inference settings that differ from the first's."""
    first_name, first = next(iter(reports.items()))
    base = {"steps": first.get("steps"), **(first.get("inference") or {})}
    lines = []
    for name, report in list(reports.items())[1:]:
        own = {"steps": report.get("steps"), **(report.get("inference") or {})}
        diff = [
            f"{k} {base.get(k)!r} -> {own.get(k)!r}"
            for k in sorted(set(base) | set(own))
            if base.get(k) != own.get(k)
        ]
        lines.append(f"{name} vs {first_name}: " + (", ".join(diff) or "the same settings"))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors are one line and exit 2."""
    p = Parser(prog="train/compare.py", description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", metavar="NAME=REPORT.json")
    p.add_argument("--settings", action="store_true", help="compare inference settings: they may differ")
    args = p.parse_args(argv)

    def run() -> int:
        if args.settings:
            reports = load_reports(args.reports, tuple(k for k in SAME if k not in SETTINGS))
            head = settings_lines(reports) + [""]
        else:
            reports, head = load_reports(args.reports), []
        paired = paired_table(reports)
        print(
            "\n".join(
                head + kind_table(reports) + [""] + edit_table(reports) + ([""] + paired if paired else [])
            )
        )
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
