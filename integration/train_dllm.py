"""Train the project's own LLaDA and Dream-architecture dLLMs (deterministic per seed and device).

Corpus: the running interpreter's standard library, split by file into train / calibration /
held-out (:mod:`fair_calib_llmc.io.corpus`); tokenizer: byte-level BPE trained offline on the
train split; objective: LLaDA's (``t ~ U(0,1]``, masked CE weighted ``1/t``).

Presets:

* ``tiny``: the built-in default model shipped in ``fair_calib_llmc/assets`` (1M parameters,
  also writes the shipped calibration / held-out text). Built on one H100 in about five
  minutes::

      python integration/train_dllm.py --preset tiny --device cuda \
          --out fair_calib_llmc/assets/default-llada

* ``reference``: the benchmark's LLaDA reference model (about 24M parameters, bf16, the
  recursive stdlib, a fixed number of steps on one GPU), saved in the public LLaDA layout in
  shards of at most 15 MB::

      python integration/train_dllm.py --preset reference --device cuda --out ref-llada

* ``dream-reference``: the Dream-architecture reference model trained the same way (Qwen2
  layers, grouped-query attention with 2 key/value heads, an MLP 1536 wide so rotations need
  ``random-hadamard`` as at 8B scale, about 27M parameters), saved in the public Dream layout::

      python integration/train_dllm.py --preset dream-reference --device cuda --out ref-dream

Training runs a fixed number of steps (``--steps``), so a model is rebuilt bit for bit on the
same device kind; ``--max-seconds`` only caps a run and makes it time-dependent. A preset names
its family; the configuration and model classes come from
:mod:`fair_calib_llmc.models.registry` (no branch on a family here), and
:data:`REFERENCE_PRESETS` pairs each family with its reference preset for
``integration/run_experiments.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from loguru import logger

from fair_calib_llmc.evaluation.metrics import elbo_perplexity
from fair_calib_llmc.io.corpus import ASSETS, chunk_text, stdlib_split
from fair_calib_llmc.io.loading import default_device
from fair_calib_llmc.io.tokenization import train_bpe_tokenizer
from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.models.registry import family
from fair_calib_llmc.models.training import train_masked_diffusion
from fair_calib_llmc.sampling.samplers import default_sampler

#: The config fields every preset takes from the tokenizer trained in the run (the keys of
#: ``_tokenizer_values``); a preset's ``from_tokenizer`` adds its family's own.
TOKENIZER_FIELDS = dict(
    vocab_size="length",
    mask_token_id="mask_token_id",
    eos_token_id="eos_token_id",
    pad_token_id="pad_token_id",
)

#: the training both reference models share (so their rows compare across families)
REFERENCE_TRAINING = dict(
    vocab_size=8192, steps=4000, batch_size=128, seq_len=256, lr=1.5e-3, recursive=True, bf16=True
)

#: Each preset: its family (a :data:`fair_calib_llmc.models.registry.FAMILIES` name), its
#: ``config`` in the family configuration's own field names, ``from_tokenizer`` (config field
#: -> tokenizer value, beyond :data:`TOKENIZER_FIELDS`), the BPE size and the training settings.
#: The configuration and model classes come from the registry, so a family is a preset's
#: field, never a branch here.
PRESETS = {
    "tiny": dict(
        family="llada",
        config=dict(
            d_model=128,
            n_heads=4,
            n_kv_heads=4,
            n_layers=4,
            mlp_hidden_size=384,
            max_sequence_length=1024,
            rope_theta=10000.0,
        ),
        from_tokenizer=dict(embedding_size="length"),
        vocab_size=512,
        steps=12000,
        batch_size=64,
        seq_len=128,
        lr=3e-3,
        recursive=False,
        bf16=False,
    ),
    "reference": dict(
        family="llada",
        config=dict(
            d_model=512,
            n_heads=8,
            n_kv_heads=8,
            n_layers=6,
            mlp_hidden_size=1024,
            max_sequence_length=1024,
            rope_theta=10000.0,
        ),
        from_tokenizer=dict(embedding_size="length"),
        **REFERENCE_TRAINING,
    ),
    "dream-reference": dict(
        family="dream",
        config=dict(
            hidden_size=512,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_hidden_layers=6,
            intermediate_size=1536,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
        from_tokenizer=dict(bos_token_id="eos_token_id"),
        **REFERENCE_TRAINING,
    ),
}

#: family -> the preset of its benchmark reference model (what integration/run_experiments.py
#: trains for a job on that family): the one place that pairs them
REFERENCE_PRESETS = {"llada": "reference", "dream": "dream-reference"}


def _tokenizer_values(tokenizer) -> dict:
    """What a configuration may take from the tokenizer trained in the run."""
    return dict(
        length=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(preset: dict, tokenizer):
    """A randomly initialised model of the preset's family (its configuration and model
    classes from the family registry), sized by the preset."""
    spec = family(preset["family"])
    values = _tokenizer_values(tokenizer)
    fields = {**TOKENIZER_FIELDS, **preset["from_tokenizer"]}
    config = spec.config_cls()(
        **preset["config"], **{name: values[source] for name, source in fields.items()}
    )
    return spec.model_cls()(config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--write-shipped-data",
        action="store_true",
        help="also rewrite fair_calib_llmc/assets/data (tiny preset)",
    )
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    train_texts = stdlib_split("train", preset["recursive"])
    tokenizer = train_bpe_tokenizer(train_texts, preset["vocab_size"])
    if args.write_shipped_data:
        data_dir = ASSETS / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, n in (("calibration", 512), ("heldout", 128)):
            chunks = chunk_text(stdlib_split(split), 600)[:n]
            with open(data_dir / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": c}) + "\n" for c in chunks)

    ids = tokenizer(train_texts, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([i for row in ids for i in row])
    logger.info(f"{len(train_texts)} train files, {tokens.numel()} tokens")
    model = build_model(preset, tokenizer).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{n_params / 1e6:.1f}M parameters")
    start = time.monotonic()
    losses = train_masked_diffusion(
        model,
        tokens,
        steps=preset["steps"],
        batch_size=preset["batch_size"],
        seq_len=preset["seq_len"],
        lr=preset["lr"],
        seed=args.seed,
        max_seconds=args.max_seconds,
        autocast_dtype=torch.bfloat16 if preset["bf16"] else None,
    )
    seconds = time.monotonic() - start
    logger.info(
        f"trained {len(losses)} steps in {seconds:.0f}s, "
        f"final loss {sum(losses[-50:]) / len(losses[-50:]):.3f}"
    )

    if preset["bf16"]:
        model = model.to(torch.bfloat16)
    heldout = [
        torch.tensor(r[:256])
        for r in tokenizer(
            chunk_text(stdlib_split("heldout", preset["recursive"]), 1200)[:64],
            add_special_tokens=False,
        )["input_ids"]
    ]
    spec = diffusion_spec(model)  # once: the ELBO and the samples take it
    ppl = elbo_perplexity(model, heldout, mc_samples=8, spec=spec)
    logger.info(f"held-out ELBO perplexity {ppl:.2f}")
    samples = []
    sampler = default_sampler(spec, gen_length=64)
    for text in chunk_text(stdlib_split("heldout", preset["recursive"]), 400)[:3]:
        prompt = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:48])
        trace = sampler.generate(model, prompt, spec=spec)
        samples.append(
            {"prompt": tokenizer.decode(prompt), "answer": tokenizer.decode(trace.generated[0])}
        )
        logger.info(f"sample: {samples[-1]}")

    out = Path(args.out)
    model.cpu().save_pretrained(out, max_shard_size="15MB")
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "settings": preset,
                "args": vars(args),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "parameters": n_params,
                "steps_run": len(losses),
                "seconds": seconds,
                "heldout_elbo_ppl": ppl,
                "samples": samples,
                "losses": losses[::10],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
