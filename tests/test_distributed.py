"""FAIR-Calib under ``torchrun``: two CPU processes (gloo) give the checkpoint one gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix
from transformers import AutoModel

from .helpers import save_with_tokenizer

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("distributed_worker.py")
FAIR_STAGE = r"""
fair_stage:
  fair_modifiers:
    FAIRCalibModifier:
      scheme: W4A4_G128_PACKED
      targets: [Linear]
"""
# the rotations of fair_calib_quarot_w4a4 / fair_calib_w4a4 (a few learning steps): fused
# into weights all ranks share, once (they were fused once per rank: E R1 R1 with two)
ROTATIONS = {
    "fixed": """
rotate_stage:
  rotate_modifiers:
    ExactSpinQuantModifier:
      rotations: [R1, R2, R4]
      transform_type: random-hadamard
""",
    "learned": """
rotate_stage:
  rotate_modifiers:
    LearnedSpinQuantModifier:
      rotations: [R1, R2, R4]
      transform_type: random-hadamard
      learn: [R1, R2]
      steps: 4
""",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str]) -> None:
    # a clean environment: in-process CLI tests may have set llm-compressor's / tqdm's switches
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_COMPRESSOR", "TQDM"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _fused_r1(width: int, learned: torch.Tensor | None) -> torch.Tensor:
    """The residual rotation SpinQuant's R1 fuses: compressed-tensors' random Hadamard (the R1
    factory's first draw from its default-seeded generator), times the learned R1 if any."""
    generator = torch.Generator()
    hadamard = random_hadamard_matrix(width, torch.float64, torch.device("cpu"), generator)
    hadamard = hadamard / width**0.5
    return hadamard if learned is None else hadamard @ learned.double()


def _probe(path: Path) -> torch.Tensor:  # the checkpoint loads and computes
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40)[None] % model.config.vocab_size).logits


@pytest.mark.parametrize("rotations", ["fixed", "learned"])
def test_two_processes_give_the_one_process_checkpoint(
    llada, tokenizer, calibration_texts, tmp_path, rotations
):
    fp = save_with_tokenizer(llada, tokenizer, tmp_path / "fp")
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(calibration_texts))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ROTATIONS[rotations] + FAIR_STAGE)
    args = [str(WORKER), str(fp), str(texts)]
    _run([sys.executable, *args, str(tmp_path / "one"), str(tmp_path / "one"), str(recipe)])
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            *args,
            str(tmp_path / "two"),
            str(tmp_path / "two"),
            str(recipe),
        ]
    )
    one = json.loads((tmp_path / "one-0.json").read_text())
    ranks = [json.loads((tmp_path / f"two-{r}.json").read_text()) for r in (0, 1)]
    # Stage I: each rank rolled out half of the prompts; together they are the same states,
    # weighted with the same (all-reduced) prior and normalisation
    assert 0 < len(ranks[0]["input_ids"]) < len(one["input_ids"])
    together = sorted(
        zip(
            ranks[0]["input_ids"] + ranks[1]["input_ids"],
            ranks[0]["loss_mask"] + ranks[1]["loss_mask"],
            strict=True,
        )
    )
    alone = sorted(zip(one["input_ids"], one["loss_mask"], strict=True))
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    torch.testing.assert_close(
        torch.tensor([w for _, w in together]), torch.tensor([w for _, w in alone])
    )
    # Rotations: every rank's embedding is the full-precision one rotated once (R1 = the
    # Hadamard, times the learned R1), as one process's is (fixed R1: the same one)
    embedding = llada.get_input_embeddings().weight.detach().double()
    fused = {
        run: torch.load(tmp_path / f"{run}-embedding.pt") for run in ("one-0", "two-0", "two-1")
    }
    for run, got in fused.items():
        torch.testing.assert_close(
            got["embedding"].double(),
            embedding @ _fused_r1(embedding.shape[1], got["learned_r1"]),
            msg=run,
        )
    if rotations == "fixed":
        assert torch.equal(fused["one-0"]["embedding"], fused["two-0"]["embedding"])
    # Stage II: every rank solves with the statistics of all states (summed over ranks): the
    # ranks agree on every linear of the first layer, and q/k/v (the first group, which no
    # GPTQ rounding of the layer precedes) equal one process's up to the order of float sums
    ranks_layer0 = [torch.load(tmp_path / f"two-{rank}-layer0.pt") for rank in (0, 1)]
    assert len(ranks_layer0[0]) == len(ranks_layer0[1]) == 7  # the first layer's linears
    for got, expected in zip(*ranks_layer0, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    if rotations == "fixed":  # learned: another R1 than one process's
        alone = torch.load(tmp_path / "one-0-layer0.pt")
        for got, expected in zip(ranks_layer0[0][:3], alone[:3], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    # only rank 0 wrote a checkpoint, and nothing was left behind (no partial directories)
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"fp", "one", "two"}
    assert not list(tmp_path.glob(".*"))
    # The checkpoints themselves are not compared logit by logit: W4A4 GPTQ turns float-level
    # differences of the Hessian into other roundings, which later layers amplify (a
    # one-process run with another batch size differs as much). Both load and compute.
    assert torch.isfinite(_probe(tmp_path / "two")).all()
