"""Merge benchmark runs that split one benchmark (one process per seed on a shared GPU).

    python integration/merge_results.py OUT RUN_DIR [RUN_DIR ...]

Writes ``results.json``, ``results.md`` and ``flips.png`` for all rows of the runs into
a new directory ``OUT`` (:func:`fair_calib_llmc.evaluation.report.merge_results`), followed by each
run's own "Measured on ..." line (device, date, wall time, command).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fair_calib_llmc.evaluation.report import merge_results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    table = merge_results([Path(r) for r in args.runs], Path(args.out))
    footers = [
        line
        for run in args.runs
        for line in (Path(run) / "results.md").read_text().splitlines()
        if line.startswith("Measured on")
    ]
    note = f"\nMerged from {len(args.runs)} runs that shared the device:\n\n" + "\n".join(
        f"- {line}" for line in footers
    )
    with open(Path(args.out) / "results.md", "a") as f:
        f.write(note + "\n")
    print(table + "\n" + note)


if __name__ == "__main__":
    main()
