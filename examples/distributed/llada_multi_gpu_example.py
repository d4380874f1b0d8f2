"""FAIR-Calib W4A4 on several GPUs of one host, through llm-compressor's distributed oneshot.

    torchrun --nproc_per_node 2 examples/distributed/llada_multi_gpu_example.py [MODEL_DIR]

Every process loads the model on its own GPU and calls the same ``fair_calib_llmc.quantize``:
Stage I rolls out each process's share of the calibration prompts and sums the prior over
processes; Stage II calibrates each process's states, sums FAIR-Calib's statistics over
processes and lets llm-compressor's GPTQ quantize each module on an owner rank and broadcast
it; only rank 0 writes the checkpoint. On CPUs, initialise ``gloo`` instead of ``init_dist``
(``tests/distributed_worker.py`` does).
"""

import sys

import torch
from compressed_tensors.offload import init_dist
from transformers import AutoModel, AutoTokenizer

import fair_calib_llmc
from fair_calib_llmc.io.corpus import shipped_texts

init_dist()  # NCCL process group from torchrun's environment, one GPU per process

MODEL_ID = sys.argv[1] if len(sys.argv) > 1 else str(fair_calib_llmc.DEFAULT_MODEL_DIR)
device = torch.device("cuda", torch.cuda.current_device())
model = AutoModel.from_pretrained(MODEL_ID, dtype="auto").to(device).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

result = fair_calib_llmc.quantize(
    model,
    tokenizer,
    "fair_calib_w4a4",
    shipped_texts("calibration"),
    output_dir=MODEL_ID.rstrip("/").split("/")[-1] + "-W4A4-FAIR",
    overwrite=True,
    max_prompts=64,
)
if torch.distributed.get_rank() == 0:
    print(f"saved to {result.output_dir}")
torch.distributed.destroy_process_group()
