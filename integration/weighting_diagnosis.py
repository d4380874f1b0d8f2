"""Why frontier weights tie uniform weights: how far the weighted optimum moves from uniform.

    python integration/weighting_diagnosis.py --out weighting-diagnosis [--model DIR]
        [--seeds 0 1 2] [--frontier-weights 4 16 64]

For each Stage I ``frontier_weight`` (the shipped recipes use 4) and seed, Stage I builds the
weighted masked-stage states once, and the learned rotations of ``fair_calib_w4a4``
(R1 + R2, layer MSE, int4 activations in the loop) learn twice on them: with the frontier
weights (F) and with uniform weights (U). Each learned model is scored under both weightings
of the same states. Reported, mean and spread over seeds:

* the share of the weight mass on frontier tokens (the tokens each state commits);
* the frontier-weighted objective over the uniform one at the start: a ratio that stays the
  same whatever the rotations are means the weighted objective is the uniform one rescaled,
  and its optimum is the uniform optimum;
* the weighting's own gain: how much lower F's frontier objective is than U's, as a fraction
  of what F's learning gained (0: the weights do not change what is learned);
* how far F's R1 is from U's, against how far F's R1 moved from its start (RMS entries).

The learning itself is the shipped recipe's; nothing here is tuned to the flips.
"""

from __future__ import annotations

import argparse
import copy
import json
import random

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from seed_runs import add_seed_run_arguments, results_dir, seed_table  # integration/

from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.loading import load_model
from fair_calib_llmc.models import LM_HEAD
from fair_calib_llmc.recipe import load_recipe
from fair_calib_llmc.stage1.prior import PriorSettings
from fair_calib_llmc.stage1.states import Stage1Settings, build_calibration_dataset
from fair_calib_llmc.stage2.learned_rotations import LearnedSpinQuantModifier
from fair_calib_llmc.stage2.learned_rotations.cayley import distance_moved

RECIPE = "fair_calib_w4a4"
SCHEME = "W4A4_G128_PACKED"  # the recipe's
COLUMNS = {
    "frontier_mass_share": "frontier mass share",
    "start_ratio": "frontier / uniform objective at start",
    "after_ratio_F": "same, after F",
    "after_ratio_U": "same, after U",
    "weighting_gain": "F's frontier-objective gain over U / F's learning gain",
    "r1_F_vs_U": "RMS(R1_F - R1_U)",
    "r1_moved_F": "RMS(R1_F - I)",
}


def shipped_learner(token_weights: str) -> LearnedSpinQuantModifier:
    """The shipped recipe's rotation learner, with ``token_weights`` set."""
    learner = next(
        m for m in load_recipe(RECIPE).modifiers if isinstance(m, LearnedSpinQuantModifier)
    )
    fields = learner.model_dump(exclude_unset=True)
    return LearnedSpinQuantModifier(**{**fields, "token_weights": token_weights})


def learn(model, tokenizer, states, token_weights: str) -> LearnedSpinQuantModifier:
    learner = shipped_learner(token_weights)
    # the learner reads the scheme it learns against from the quantization stage after it
    # (RTN here: what follows the learning does not change what was learned)
    quantization = QuantizationModifier(scheme=SCHEME, targets=["Linear"], ignore=[LM_HEAD])
    oneshot(
        model=copy.deepcopy(model),
        processor=tokenizer,
        recipe=[learner, quantization],
        dataset=states,
        shuffle_calibration_samples=False,
        batch_size=16,
    )
    return learner


def measure(model, tokenizer, texts, frontier_weight: float, seed: int, prompts: int) -> dict:
    stage1 = Stage1Settings(prior=PriorSettings(frontier_weight=frontier_weight))
    states, _, stats = build_calibration_dataset(
        model, tokenizer, texts, stage1, max_prompts=prompts, seed=seed
    )
    f, u = (learn(model, tokenizer, states, w) for w in ("frontier", "uniform"))
    fr, ur = f.learning_report, u.learning_report
    before = fr["before"]
    gain = before["frontier"] - fr["after"]["frontier"]
    r1_f, r1_u = f._learned["R1"], u._learned["R1"]
    return {
        "frontier_mass_share": stats.frontier_mass_share,
        "start_ratio": before["frontier"] / before["uniform"],
        "after_ratio_F": fr["after"]["frontier"] / fr["after"]["uniform"],
        "after_ratio_U": ur["after"]["frontier"] / ur["after"]["uniform"],
        "weighting_gain": (ur["after"]["frontier"] - fr["after"]["frontier"]) / gain,
        "r1_F_vs_U": distance_moved(r1_f, r1_u.detach()),
        "r1_moved_F": distance_moved(r1_f),
        "reports": {"F": fr, "U": ur},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_seed_run_arguments(parser, calibration_prompts=32)
    parser.add_argument("--frontier-weights", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    args = parser.parse_args(argv)
    out = results_dir(args)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    results: dict[str, list[dict]] = {f"{w:g}": [] for w in args.frontier_weights}
    for seed in args.seeds:
        texts = shipped_texts("calibration")
        random.Random(seed).shuffle(texts)  # each seed calibrates on other prompts
        for weight in args.frontier_weights:
            row = measure(model, tokenizer, texts, weight, seed, args.calibration_prompts)
            results[f"{weight:g}"].append(row)
            print(seed, weight, {k: round(row[k], 5) for k in COLUMNS}, flush=True)
    text = seed_table("frontier_weight", results, COLUMNS) + (
        f"\n\n{args.model}, seeds {args.seeds}, {args.calibration_prompts} calibration prompts, "
        f"the rotation learner of {RECIPE} (F: frontier weights, U: uniform weights).\n"
    )
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
