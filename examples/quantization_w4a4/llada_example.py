"""FAIR-Calib W4A4 for LLaDA, in llm-compressor's example style.

Runs as is on the built-in default model (a small LLaDA trained on Python sources; a minute
or two on a laptop CPU). For LLaDA-8B-Instruct set MODEL_ID to its directory or hub id.
"""

import torch
from llmcompressor import oneshot
from transformers import AutoModel, AutoTokenizer

import fair_calib_llmc  # registers LLaDA / Dream, FAIRCalibModifier and the W4A4 schemes
from fair_calib_llmc.io.corpus import shipped_texts

# Select model and load it (no trust_remote_code: the LLaDA classes are fair_calib_llmc's).
MODEL_ID = str(fair_calib_llmc.DEFAULT_MODEL_DIR)  # or "GSAI-ML/LLaDA-8B-Instruct"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModel.from_pretrained(MODEL_ID, dtype="auto").to(DEVICE)
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

# Select calibration text: any list of strings (here the text shipped with the default model).
NUM_CALIBRATION_PROMPTS = 32
texts = shipped_texts("calibration")

# Stage I: the full-precision model's own sampler rollouts become masked-stage states, each
# token weighted by how close it sits to the write frontier (the `loss_mask` column).
sampler = fair_calib_llmc.LLaDASampler(steps=32, gen_length=32, block_length=32)
stage1 = fair_calib_llmc.Stage1Settings(sampler=sampler, prompt_length=32, states_per_prompt=4)
ds, prior, weight_stats = fair_calib_llmc.build_calibration_dataset(
    model, tokenizer, texts, stage1, max_prompts=NUM_CALIBRATION_PROMPTS
)
print(f"frontier tokens carry {weight_stats.frontier_mass_share:.1%} of the loss weight")

# Configure the quantization algorithm: the shipped FAIR-Calib W4A4 recipe (rotations R1 + R2
# learned on the frontier-weighted states and fused, R4 online, then Stage II)
# (int4 weights in groups of 128, int4 dynamic per-token activations, packed on save).
# LEARNING_STEPS sets the rotation learner's steps (the recipe's own: 100); fewer run faster.
LEARNING_STEPS = 100
recipe = fair_calib_llmc.load_recipe(
    "fair_calib_w4a4", overrides={"LearnedSpinQuantModifier.steps": LEARNING_STEPS}
)

# Apply algorithms (the rotations, then Stage II). The rotation learner reads the frontier
# weights from the dataset's loss_mask column; use_loss_mask hands them to FAIR-Calib.
oneshot(
    model=model,
    dataset=ds,
    recipe=recipe,
    use_loss_mask=True,
    num_calibration_samples=len(ds),
    batch_size=16,  # every state has the same length: batching pads nothing
)

# Confirm generations of the quantized model look sane.
print("\n\n========== SAMPLE GENERATION ==============")
prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
trace = sampler.generate(model, prompt)
print(tokenizer.decode(trace.sequences[0]))
print("==========================================\n\n")

# Save to disk compressed (atomically: a failed save leaves no half-written directory).
SAVE_DIR = MODEL_ID.rstrip("/").split("/")[-1] + "-W4A4-FAIR"
fair_calib_llmc.save_atomically(model, tokenizer, SAVE_DIR)
print(f"saved to {SAVE_DIR}; load it with `import fair_calib_llmc` + AutoModel.from_pretrained")
