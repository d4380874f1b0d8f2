"""Build the built-in default model shipped in ``fair_calib_llmc/assets``.

Deterministic for a seed: trains a byte-level BPE and a small LLaDA-architecture dLLM on the
running interpreter's standard library (train split) with LLaDA's objective, and writes the
calibration / held-out chunks the package ships. The shipped weights were built on one
H100 (the device tool) in about five minutes::

    python integration/build_default_model.py --device cuda --steps 12000 --batch-size 64

and it also runs on CPU (``--device cpu``, about 0.4 s a step on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from loguru import logger

from fair_calib_llmc.corpus import ASSETS, chunk_text, stdlib_split
from fair_calib_llmc.models import LLaDAConfig, LLaDAModelLM
from fair_calib_llmc.tokenization import train_bpe_tokenizer
from fair_calib_llmc.training import train_masked_diffusion


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ASSETS / "default-llada"))
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    train_texts = stdlib_split("train")
    tokenizer = train_bpe_tokenizer(train_texts, args.vocab_size)
    data_dir = ASSETS / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("calibration", 512), ("heldout", 128)):
        chunks = chunk_text(stdlib_split(split), 600)[:n]
        with open(data_dir / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": c}) + "\n" for c in chunks)

    tokens = torch.tensor(
        [i for t in train_texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    )
    logger.info(f"{len(train_texts)} train files, {tokens.numel()} tokens")
    config = LLaDAConfig(
        d_model=128,
        n_heads=4,
        n_kv_heads=4,
        n_layers=4,
        mlp_hidden_size=384,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_sequence_length=512,
        rope_theta=10000.0,
    )
    model = LLaDAModelLM(config).to(args.device)
    start = time.monotonic()
    losses = train_masked_diffusion(
        model,
        tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        lr=args.lr,
    )
    logger.info(
        f"trained {len(losses)} steps in {time.monotonic() - start:.0f}s, "
        f"final loss {sum(losses[-20:]) / 20:.3f}"
    )
    model.cpu().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    with open(f"{args.out}/training_log.json", "w") as f:
        json.dump(
            {
                "args": vars(args),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "seconds": time.monotonic() - start,
                "losses": losses[::10],
            },
            f,
        )


if __name__ == "__main__":
    main()
