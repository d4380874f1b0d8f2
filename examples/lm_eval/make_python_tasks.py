"""Build the data of the offline lm-eval tasks shipped in ``fair_calib_llmc/assets/lm_eval_tasks``
(the YAMLs there are written by hand) from the default model's shipped held-out text (Python
standard-library code no training file shares).

* ``python_next_line``: four lines of code and the first word of the next line -> complete
  that line (generation; exact match and chrF);
* ``python_next_line_choice``: the four lines, and the true next line among three lines drawn
  from other files (multiple choice; acc, acc_norm);
* ``python_heldout_ppl``: 512-character held-out snippets (rolling log-likelihood; word and
  byte perplexity, bits per byte).

Deterministic; rerun after rebuilding the default model's data:
``python examples/lm_eval/make_python_tasks.py``.
"""

from __future__ import annotations

import json
import random

from fair_calib_llmc.evaluation import LM_EVAL_TASKS
from fair_calib_llmc.io.corpus import shipped_texts

TASKS = LM_EVAL_TASKS
ITEMS, CONTEXT_LINES, MAX_LINE = 48, 4, 60


def _short(line: str) -> bool:
    return 8 <= len(line.strip()) <= MAX_LINE and not line.strip().startswith("#")


def _head_and_tail(line: str) -> tuple[str, str]:
    """Split after the first word, so the model completes a started line."""
    indent = len(line) - len(line.lstrip())
    cut = line.find(" ", indent)
    return line[:cut], line[cut:]


def main() -> None:
    rng = random.Random(0)
    texts = shipped_texts("heldout")
    pool = [line for t in texts for line in t.splitlines() if _short(line)]
    items = []
    for text in rng.sample(texts, len(texts)):
        lines = text.splitlines()
        spots = [
            k
            for k in range(CONTEXT_LINES, len(lines) - 1)
            if _short(lines[k]) and " " in lines[k].strip()
        ]
        if not spots:
            continue
        k = rng.choice(spots)
        target = lines[k]
        distractors = rng.sample([line for line in pool if line != target], 3)
        choices = [target, *distractors]
        rng.shuffle(choices)
        context = "\n".join(lines[k - CONTEXT_LINES : k]) + "\n"
        head, tail = _head_and_tail(target)
        items.append(
            {
                "context": context,
                "choices": choices,
                "label": choices.index(target),
                "line_start": context + head,
                "line_rest": tail,
            }
        )
        if len(items) == ITEMS:
            break
    snippets = [{"text": t[:512]} for t in texts[:16]]
    for name, rows in (("python_next_line", items), ("python_heldout", snippets)):
        with open(TASKS / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"wrote {len(items)} next-line items and {len(snippets)} snippets to {TASKS}")


if __name__ == "__main__":
    main()
