"""FAIR-Calib W4A4 for Dream, in llm-compressor's example style.

No Dream checkpoint ships with the package, so the example first builds a tiny, untrained
Dream from a config (with the default model's tokenizer) and saves it; then it runs exactly
as it would on Dream-v0-Instruct-7B: set MODEL_ID to that directory or hub id instead.
"""

from pathlib import Path

import torch
from llmcompressor import oneshot
from transformers import AutoModel, AutoTokenizer

import fair_calib_llmc  # registers LLaDA / Dream, FAIRCalibModifier and the W4A4 schemes
from fair_calib_llmc.io.corpus import shipped_texts

MODEL_ID = "tiny-dream"  # or "Dream-org/Dream-v0-Instruct-7B"
if MODEL_ID == "tiny-dream" and not Path(MODEL_ID).exists():
    tokenizer = AutoTokenizer.from_pretrained(fair_calib_llmc.DEFAULT_MODEL_DIR)
    config = fair_calib_llmc.DreamConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    fair_calib_llmc.DreamModel(config).save_pretrained(MODEL_ID)
    tokenizer.save_pretrained(MODEL_ID)

# Select model and load it (no trust_remote_code: the Dream classes are fair_calib_llmc's).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModel.from_pretrained(MODEL_ID, dtype="auto").to(DEVICE)
tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

# Select calibration text: any list of strings.
NUM_CALIBRATION_PROMPTS = 16
texts = shipped_texts("calibration")

# Stage I with Dream's own sampler. Dream's logit column i - 1 predicts position i, so the
# frontier weights are moved one column left, onto the hidden state that decides.
sampler = fair_calib_llmc.DreamSampler(steps=32, gen_length=32, alg="entropy")
stage1 = fair_calib_llmc.Stage1Settings(sampler=sampler, prompt_length=32, states_per_prompt=4)
ds, prior, weight_stats = fair_calib_llmc.build_calibration_dataset(
    model, tokenizer, texts, stage1, max_prompts=NUM_CALIBRATION_PROMPTS
)
print(f"frontier tokens carry {weight_stats.frontier_mass_share:.1%} of the loss weight")

# Configure the quantization algorithm: the shipped FAIR-Calib W4A4 recipe (rotations R1 + R2
# learned on the frontier-weighted states and fused, R4 online, then Stage II; the loader
# keeps Dream's lm_head in full precision).
# LEARNING_STEPS sets the rotation learner's steps (the recipe's own: 100); fewer run faster.
LEARNING_STEPS = 100
recipe = fair_calib_llmc.load_recipe(
    "fair_calib_w4a4", overrides={"LearnedSpinQuantModifier.steps": LEARNING_STEPS}
)

# Apply algorithms (the rotations, then Stage II).
oneshot(
    model=model,
    dataset=ds,
    recipe=recipe,
    use_loss_mask=True,
    num_calibration_samples=len(ds),
    batch_size=16,  # every state has the same length: batching pads nothing
)

# Confirm generations of the quantized model look sane (an untrained tiny Dream babbles).
print("\n\n========== SAMPLE GENERATION ==============")
prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
trace = sampler.generate(model, prompt)
print(tokenizer.decode(trace.sequences[0]))
print("==========================================\n\n")

# Save to disk compressed (atomically: a failed save leaves no half-written directory).
SAVE_DIR = MODEL_ID.rstrip("/").split("/")[-1] + "-W4A4-FAIR"
fair_calib_llmc.save_atomically(model, tokenizer, SAVE_DIR)
print(f"saved to {SAVE_DIR}; load it with `import fair_calib_llmc` + AutoModel.from_pretrained")
