"""Loading a LLaDA / Dream checkpoint where the user runs: device and dtype.

Defaults follow llm-compressor users' expectations: the GPU when there is one, the
checkpoint's own dtype (``dtype="auto"``). The model is loaded on the CPU and then moved:
Stage I's rollouts run the whole model on ``device``, and ``oneshot`` keeps modules on the
device they are on (its sequential pipeline onloads CPU modules to the GPU layer by layer).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from loguru import logger
from safetensors import SafetensorError

__all__ = ["DTYPES", "default_device", "load_model", "resolve_device", "resolve_dtype"]

#: ``--dtype`` names; ``auto`` keeps the checkpoint's dtype.
DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
#: seconds the hub may take to answer one request before it counts as unreachable
_HUB_PROBE_SECONDS = 3.0


def default_device() -> str:
    """The device every command and library function uses when none is given: ``cuda`` when
    a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> :func:`default_device`; a GPU that is not there fails here, not inside the
    first forward pass."""
    if device is None:
        return torch.device(default_device())
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(
                f"device {device} was asked for but {count} CUDA GPU(s) are visible; use "
                "--device cpu or check CUDA_VISIBLE_DEVICES"
            )
    return device


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """A ``torch.dtype`` or one of :data:`DTYPES`' names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_reachable(hub_id: str) -> bool:
    """One short request to the hub (``HF_ENDPOINT``), unless ``HF_HUB_OFFLINE`` is set.

    Without it an unreachable hub costs about a minute of retries before transformers gives
    up; with it, a model in the local cache still loads (``local_files_only``) and any other
    fails at once.
    """
    import httpx
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_SECONDS)
    except (httpx.HTTPError, OSError) as err:
        logger.debug(f"{constants.ENDPOINT} is not reachable ({err}); {hub_id}: cache only")
        return False
    return True


#: a local checkpoint directory holds at least one of these when it has a tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_dllm_config(local: Path) -> None:
    """Refuse a checkpoint of another architecture from its config.json, before transformers
    loads (and reports on) its weights."""
    from fair_calib_llmc.models.registry import FAMILIES

    try:
        model_type = json.loads((local / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{local}/config.json is not readable JSON ({err}); fix the file"
        ) from None
    known = tuple(spec.model_type for spec in FAMILIES.values())
    if model_type not in known:
        raise ValueError(
            f"{local} holds a {model_type!r} model, not a diffusion LM ({' or '.join(known)}); "
            "pass --model a LLaDA or Dream checkpoint directory"
        )


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
):
    """Return ``(model, tokenizer)`` of a local LLaDA / Dream checkpoint (or a hub id, where
    the hub can be reached), in ``dtype`` on ``device``."""
    from transformers import AutoModel, AutoTokenizer

    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; pass --model a LLaDA or Dream checkpoint directory "
            "(the folder that holds config.json and the safetensors)"
        )
    if not local.exists() and not _HUB_ID.match(str(path)):
        raise FileNotFoundError(
            f"no such model directory: {path}; pass --model a LLaDA or Dream checkpoint "
            "directory or a hub id (org/name)"
        )
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        # before the model loads (minutes at 8B); transformers' own message names no file
        raise FileNotFoundError(
            f"{path} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}); save the model's "
            f"tokenizer into it (tokenizer.save_pretrained({str(path)!r}))"
        )
    if local.is_dir():
        _check_dllm_config(local)
    device = resolve_device(device)
    source = str(local) if local.exists() else str(path)
    cached_only = not local.exists() and not _hub_reachable(source)
    try:
        model = AutoModel.from_pretrained(
            source, dtype=resolve_dtype(dtype), local_files_only=cached_only
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cached_only)
    except OSError as err:
        if cached_only:
            raise FileNotFoundError(
                f"the model hub cannot be reached and {path} is not in the local cache; pass "
                "--model a local checkpoint directory (downloaded where the hub is reachable)"
            ) from None
        raise FileNotFoundError(f"could not load {path}: {str(err).splitlines()[0]}") from err
    except SafetensorError as err:  # a truncated download or an interrupted copy
        raise ValueError(
            f"could not load {path}: a .safetensors file in it is damaged or truncated "
            f"({str(err).splitlines()[0]}); copy or download the checkpoint again"
        ) from err
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug(f"loaded {source}: {n_params / 1e6:.1f}M parameters, {model.dtype}, on {device}")
    return model, tokenizer
