"""Benchmark: ``stagewise select`` on SciFact with the candidates in scifact_select.yaml, then a screenshot.

    python benchmarks/scifact_select.py [--data ../shared/datasets/scifact] [--out benchmarks/results/scifact_select]

Train on SciFact's train split, choose on dev. The report lands in --out (report.html, report.md,
selection.json); a screenshot of it goes to docs/images/scifact_select_report.png when Chromium is installed.
An interrupted run continues where it stopped (finished steps are not redone).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stagewise.selection.config import load_select_config
from stagewise.selection.report.write import render_screenshot
from stagewise.selection.strategy import select

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parents[0] / ".." / "shared" / "datasets" / "scifact"))
    parser.add_argument("--out", default="benchmarks/results/scifact_select")
    parser.add_argument("--screenshot", default=str(HERE.parent / "docs" / "images" / "scifact_select_report.png"))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    config = load_select_config(HERE / "scifact_select.yaml", data=args.data)
    out = Path(args.out)
    result = select(config, out, resume=(out / "config.json").is_file())
    print("\n".join(result["verdict"]["summary"]))
    print(f"wall time {result['wall_seconds']:.0f} s; report {out / result['report']['html']}")
    if render_screenshot(out / result["report"]["html"], Path(args.screenshot)):
        print(f"screenshot {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
