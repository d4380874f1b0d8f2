"""Import time of ``fair_calib_llmc`` against plain ``torch, transformers``, measured in one run.

Each statement runs in a fresh interpreter (``python -c``), alternating, ``--repeats`` times;
the medians and their ratio are printed, and whatever the package import wrote to stdout or
stderr (it should write nothing). A third line shows what any checkpoint consumer pays anyway:
``transformers.AutoModel``, whose first use imports transformers' modeling machinery (which a
bare ``import transformers`` defers), and which registering the LLaDA / Dream classes needs.

    python integration/import_time.py               # 5 repeats
    python integration/import_time.py --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "torch, transformers": "import torch, transformers",
    "transformers.AutoModel": "import torch; from transformers import AutoModel",
    "fair_calib_llmc": "import fair_calib_llmc",
}


def _run(statement: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", statement], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, out.stdout + out.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _run(STATEMENTS["fair_calib_llmc"])  # warm the page cache and the bytecode caches
    seconds: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    printed = set()
    for _ in range(args.repeats):
        for name, statement in STATEMENTS.items():
            elapsed, output = _run(statement)
            seconds[name].append(elapsed)
            if name == "fair_calib_llmc" and output:
                printed.add(output)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, median in medians.items():
        print(f"import {name:<24} median {median:5.2f} s over {args.repeats} runs")
    base = medians["torch, transformers"]
    print(f"ratio fair_calib_llmc / torch, transformers: {medians['fair_calib_llmc'] / base:.2f}")
    ratio = medians["fair_calib_llmc"] / medians["transformers.AutoModel"]
    print(f"ratio fair_calib_llmc / transformers.AutoModel: {ratio:.2f}")
    for output in printed:
        print(f"fair_calib_llmc printed on import:\n{output}")
    print("printed on import: " + ("yes (above)" if printed else "nothing"))
    return 1 if printed else 0


if __name__ == "__main__":
    sys.exit(main())
