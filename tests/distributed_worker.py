"""One FAIR-Calib ``quantize`` run, as a single process or as one rank under ``torchrun``.

Used by ``tests/test_distributed.py``: ``python tests/distributed_worker.py FP_DIR TEXTS OUT
DUMP RECIPE`` (one process) and ``torchrun --nproc_per_node 2 tests/distributed_worker.py ...`` (two
CPU processes over gloo). Each process dumps the calibration states it calibrated on.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

if "WORLD_SIZE" in os.environ:  # torchrun; CPUs only, so gloo (init_dist picks an accelerator)
    dist.init_process_group("gloo")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

import fair_calib_llmc  # noqa: E402
import fair_calib_llmc.stage2.modifier as modifier  # noqa: E402

fp_dir, texts_file, out_dir, dump, recipe = sys.argv[1:6]
first_layer = []  # the least-squares inputs of layer 0's linears, as the modifier saw them
solve = modifier.fp_target_weight


def recording_solve(weight, cross, hessian, **kwargs):
    if len(first_layer) < 7:
        first_layer.append(torch.stack([cross, hessian]).clone())
    return solve(weight, cross, hessian, **kwargs)


modifier.fp_target_weight = recording_solve
model = AutoModel.from_pretrained(fp_dir, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(fp_dir)
result = fair_calib_llmc.quantize(
    model,
    tokenizer,
    recipe,
    json.loads(open(texts_file).read()),
    output_dir=out_dir,
    max_prompts=4,
    batch_size=1,
)
rank = dist.get_rank() if dist.is_initialized() else 0
states = {key: list(result.calibration[key]) for key in ("input_ids", "loss_mask")}
with open(f"{dump}-{rank}.json", "w") as f:
    json.dump(states, f)
torch.save(first_layer, f"{dump}-{rank}-layer0.pt")
# the rotated recipes fuse R1 into the embedding (a learned R1 on top of the Hadamard)
learned = next((m._learned.get("R1") for m in result.modifiers if hasattr(m, "_learned")), None)
fused = {"embedding": result.model.get_input_embeddings().weight.detach(), "learned_r1": learned}
torch.save(fused, f"{dump}-{rank}-embedding.pt")
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
