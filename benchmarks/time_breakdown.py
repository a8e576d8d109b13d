"""Where a selection's time went, side by side for several runs: per kind of work, per step, and per unit.

    python benchmarks/time_breakdown.py RUN_A/selection.json RUN_B/selection.json [--names before after]

Reads the ``time`` record every ``select`` writes (``stagewise.timing``) and prints Markdown tables: seconds and
share per kind of work, seconds per step, and the rate of every timed span (documents encoded, pairs scored,
examples trained per second), with the CPU each run measured on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    if "time" not in data:
        raise SystemExit(f"{path}: no time record (a selection from before the timings were kept)")
    return data


def tables(runs: dict[str, dict]) -> str:
    names = list(runs)
    out = ["| run | CPU | wall |", "|---|---|---|"]
    for name, sel in runs.items():
        machine = sel.get("machine", {})
        out.append(f"| {name} | {machine.get('cpu')} ({machine.get('cpus')} cores; "
                   f"{machine.get('cpu_flags', '')}) | {sel['wall_seconds'] / 60:.1f} min |")
    kinds = list(dict.fromkeys(k for sel in runs.values() for k in sel["time"]["by_kind"]))
    out += ["", "| work | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for kind in kinds + ["other"]:
        cells = []
        for sel in runs.values():
            time = sel["time"]
            seconds = time["other_seconds"] if kind == "other" else time["by_kind"].get(kind, {}).get("seconds")
            cells.append("—" if seconds is None else f"{seconds:,.0f} s ({seconds / time['wall_seconds']:.0%})")
        out.append(f"| {kind} | " + " | ".join(cells) + " |")
    steps = list(dict.fromkeys(s for sel in runs.values() for s in sel["time"]["by_step"]))
    out += ["", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step in steps:
        cells = [f"{sel['time']['by_step'][step]:,.0f} s" if step in sel["time"]["by_step"] else "—"
                 for sel in runs.values()]
        out.append(f"| {step} | " + " | ".join(cells) + " |")
    out += ["", "| run | step | work | on | processed | seconds | rate |", "|---|---|---|---|---|---|---|"]
    for name, sel in runs.items():
        for span in sel["time"]["spans"]:
            if span["seconds"] < 1:
                continue
            rate = f"{span['rate']:,.1f} {span['unit']}/s" if span.get("rate") else "—"
            items = f"{span['items']:,.0f} {span['unit']}" if span.get("items") else "—"
            out.append(f"| {name} | {span['step']} | {span['kind']} | {span['what']} | {items} | "
                       f"{span['seconds']:,.1f} | {rate} |")
    estimates = [(name, e) for name, sel in runs.items() for e in sel["time"].get("estimates", [])]
    if estimates:
        out += ["", "| run | step | estimated | share | took | took / estimated |", "|---|---|---|---|---|---|"]
        for name, e in estimates:
            share = "—" if e.get("share_s") is None else f"{e['share_s']:,.0f} s"
            out.append(f"| {name} | {e['step']} | {e['estimated_s']:,.0f} s | {share} | {e['actual_s']:,.0f} s | "
                       f"{e['actual_over_estimate']} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("selections", nargs="+", help="selection.json files")
    parser.add_argument("--names", nargs="+", help="a name per file (default: the run folder's name)")
    args = parser.parse_args()
    names = args.names or [Path(p).parent.name for p in args.selections]
    if len(names) != len(args.selections):
        parser.error("--names needs one name per selection.json")
    print(tables({n: _load(p) for n, p in zip(names, args.selections)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
