"""Fixtures: an offline tokenizer, tiny LLaDA / Dream models, calibration text.

Every test is marked ``unit`` or ``integration`` (``-m unit`` runs the fast ones); an unmarked
test fails collection.
"""

from __future__ import annotations

import pytest
import torch

from fair_calib_llmc.io.tokenization import train_bpe_tokenizer
from fair_calib_llmc.models import DreamModel, LLaDAModelLM

from .helpers import PACKAGE_SOURCES, dream_config, llada_config, sharpen


def pytest_collection_modifyitems(items):
    unmarked = [
        item.nodeid
        for item in items
        if not any(item.get_closest_marker(m) for m in ("unit", "integration"))
    ]
    if unmarked:
        raise pytest.UsageError(f"mark these tests unit or integration: {unmarked}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many small ops; on a shared 2-core machine two intra-op threads spin
    against each other and run 10-40x slower than one. Modules that run many tiny forwards ask
    for it with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (once per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(PACKAGE_SOURCES, vocab_size=320)


@pytest.fixture
def llada(tokenizer):
    return sharpen(LLaDAModelLM(llada_config(tokenizer)), seed=0)


@pytest.fixture
def dream(tokenizer):
    return sharpen(DreamModel(dream_config(tokenizer)), seed=1)


@pytest.fixture(params=["llada", "dream"])
def dllm(request, llada, dream):
    return {"llada": llada, "dream": dream}[request.param]


@pytest.fixture(scope="session")
def calibration_texts():
    """Real text the tokenizer knows: the frozen package sources, in 400-character pieces."""
    text = "\n".join(PACKAGE_SOURCES)
    return [text[i : i + 400] for i in range(0, 400 * 12, 400)]
