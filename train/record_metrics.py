"""Record evaluation reports in a shipped model's ``metrics.json``.

``python train/record_metrics.py --model DIR NAME=REPORT.json [NAME=REPORT.json ...]`` keeps, for
each report, the edit success per kind/edit/split, the expressive scores, the pixel metrics and
the settings it was made with. The names ``ci_subset`` and ``ci_heldout`` (reports of the first 20
examples of the seed-1 ``test`` and the seed-2 ``heldout_paraphrase`` splits, ``CI_SETS``) are what
``tests/test_shipped.py`` re-measures on every CI run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgie.cli import Parser, run_command  # noqa: E402

# The reports that tests/test_shipped.py re-measures: the first 20 examples of this (seed, split).
CI_SETS = {"ci_subset": (1, "test"), "ci_heldout": (2, "heldout_paraphrase")}


def summary(report: dict) -> dict:
    """The parts of an evaluation report worth keeping beside the weights."""
    out = {
        "n": report["n"],
        "data": report.get("data"),
        "steps": report.get("steps"),
        "inference": report.get("inference"),
        "metrics": {k: v for k, v in report["metrics"].items() if isinstance(v, float)},
    }
    if "edit_success" in report:
        out["edit_success"] = report["edit_success"]["all"]["rate"]
        out["edit_success_by"] = {k: v["rate"] for k, v in report["edit_success"].items() if k != "all"}
    if isinstance(report.get("expressive"), dict):  # a string when the model writes no text
        out["expressive_exact"] = report["expressive"]["exact_match"]
        out["expressive_f1"] = report["expressive"]["token_f1"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors are one line and exit 2."""
    p = Parser(prog="train/record_metrics.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model folder whose metrics.json is written")
    p.add_argument("reports", nargs="+", metavar="NAME=REPORT.json")
    args = p.parse_args(argv)

    def run() -> int:
        path = Path(args.model) / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        for item in args.reports:
            name, sep, report = item.partition("=")
            if not sep or not name:
                raise ValueError(f"expected NAME=REPORT.json, got {item!r}")
            metrics[name] = summary(json.loads(Path(report).read_text()))
            if name in CI_SETS:
                seed, split = CI_SETS[name]
                metrics[name].update(seed=seed, split=split)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {path}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
