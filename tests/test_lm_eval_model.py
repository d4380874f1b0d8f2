"""The ``dllm`` lm-evaluation-harness model, offline, on tiny LLaDA / Dream checkpoints (FP and
a compressed W4A4 checkpoint), checked against references computed without the harness:
likelihoods by enumerating every mask of the continuation, answers by calling the family's
sampler directly."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fair_calib_llmc.evaluation.harness import (  # noqa: E402
    DiffusionHarnessLM,
    masked_diffusion_loglikelihood,
)
from fair_calib_llmc.models import DreamModel, LLaDAModelLM, diffusion_spec  # noqa: E402
from fair_calib_llmc.models.configs import LM_HEAD, LM_HEADS  # noqa: E402
from fair_calib_llmc.sampling.samplers import sampler_for  # noqa: E402

from .helpers import dream_config, llada_config, save_with_tokenizer, sharpen  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval_tasks"
GEN_TOKENS = 8  # the generation task's max_gen_toks
MC_SAMPLES = 64  # every continuation of <= 6 tokens is then scored exactly


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """{(family, 'fp' | 'w4a4'): checkpoint dir} for tiny models of both families."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    root = tmp_path_factory.mktemp("lm_eval_ckpts")
    dirs = {}
    for family, model in (
        ("llada", LLaDAModelLM(llada_config(tokenizer))),
        ("dream", DreamModel(dream_config(tokenizer))),
    ):
        fp_dir = save_with_tokenizer(sharpen(model, seed=3), tokenizer, root / f"{family}-fp")
        quantized = oneshot(
            model=AutoModel.from_pretrained(fp_dir, dtype=torch.float32),
            recipe=QuantizationModifier(
                scheme="W4A4_G128_PACKED",
                targets=["Linear"],
                ignore=list(LM_HEADS),
            ),
        )
        q_dir = root / f"{family}-w4a4"
        quantized.save_pretrained(q_dir, save_compressed=True)
        tokenizer.save_pretrained(q_dir)
        dirs[family, "fp"], dirs[family, "w4a4"] = fp_dir, q_dir
    return dirs


@pytest.fixture
def in_repo(monkeypatch):
    """The task YAMLs name their JSON relative to the repository root; never go online."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- references, written without the harness ---------------------------------------------------
def _reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p over the vocabulary at every position of one input; the mask token excluded."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    if model.config.model_type == "Dream":  # Dream's logit i predicts token i + 1
        logits = torch.cat([logits[:1], logits[:-1]])
    logits[:, model.config.mask_token_id] = -math.inf
    return logits.log_softmax(-1)


def _exact_elbo(model, context: list[int], continuation: list[int]) -> float:
    """E_l E_{|S|=l} (T/l) sum_{i in S} log p(x_i | continuation S masked), by enumeration."""
    n = len(continuation)
    total = 0.0
    for n_masked in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), n_masked))
        for subset in subsets:
            noisy = list(continuation)
            for i in subset:
                noisy[i] = model.config.mask_token_id
            log_p = _reference_logprobs(model, context + noisy)
            score = sum(float(log_p[len(context) + i, continuation[i]]) for i in subset)
            total += (n / n_masked) * score / len(subsets) / n
    return total


def _split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = tokenizer(context + continuation)["input_ids"]
    head = tokenizer(context)["input_ids"]
    assert whole[: len(head)] == head
    return head, whole[len(head) :]


def _run_tasks(path, **model_args):
    return lm_eval.simple_evaluate(
        model="dllm",
        model_args={"pretrained": str(path), "mc_samples": MC_SAMPLES, **model_args},
        tasks=["tiny_dllm_generate", "tiny_dllm_choice"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        device="cpu",
        batch_size=4,
    )


# --- tests ----------------------------------------------------------------------------------------
def test_importing_the_package_registers_dllm():
    import fair_calib_llmc  # noqa: F401

    assert model_registry.get("dllm") is DiffusionHarnessLM


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", ["fp", "w4a4"])
def test_simple_evaluate_matches_independent_scores(checkpoints, tokenizer, in_repo, family, kind):
    path = checkpoints[family, kind]
    out = _run_tasks(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    if kind == "w4a4":
        assert model.config.quantization_config is not None

    # multiple choice: every choice's bound by enumeration, acc by hand
    correct = []
    for sample in out["samples"]["tiny_dllm_choice"]:
        scores = []
        for (context, choice), (log_p, _greedy) in zip(
            sample["arguments"], sample["filtered_resps"], strict=True
        ):
            head, tail = _split(tokenizer, context, choice)
            assert 2 ** len(tail) - 1 <= MC_SAMPLES  # the harness took its exact branch
            expected = _exact_elbo(model, head, tail)
            assert log_p == pytest.approx(expected, abs=2e-4)
            scores.append(expected)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == sample["target"])
    acc = out["results"]["tiny_dllm_choice"]["acc,none"]
    assert acc == pytest.approx(sum(correct) / len(correct))

    # generation: the family's sampler called directly, one prompt at a time
    settings = {"steps": GEN_TOKENS, "gen_length": GEN_TOKENS}
    if family == "llada":
        settings["block_length"] = GEN_TOKENS
    sampler = sampler_for(diffusion_spec(model, tokenizer), **settings)
    matches = []
    for sample in out["samples"]["tiny_dllm_generate"]:
        context = sample["arguments"][0][0]
        prompt = torch.tensor(tokenizer(context)["input_ids"])
        tokens = sampler.generate(model, prompt, tokenizer=tokenizer, seed=1234).generated[0]
        tokens = tokens.tolist()
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        answer = tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == answer
        matches.append(answer == sample["target"])
    exact = out["results"]["tiny_dllm_generate"]["exact_match,none"]
    assert exact == pytest.approx(sum(matches) / len(matches))


def _lm(path, **kwargs) -> DiffusionHarnessLM:
    return DiffusionHarnessLM(pretrained=str(path), device="cpu", **kwargs)


def test_monte_carlo_bound_is_seeded_batch_independent_and_unbiased(checkpoints):
    path = checkpoints["llada", "fp"]
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    context, continuation = [5, 9, 31, 7], [40, 41, 42, 43, 44, 45, 46, 47]  # 255 masks
    spec = diffusion_spec(model)
    exact = masked_diffusion_loglikelihood(model, context, continuation, mc_samples=255, spec=spec)
    assert exact == pytest.approx(_exact_elbo(model, context, continuation), abs=1e-4)

    def mc(seed, batch_size=32):
        return masked_diffusion_loglikelihood(
            model, context, continuation, mc_samples=64, batch_size=batch_size, seed=seed, spec=spec
        )

    assert mc(0) == mc(0)
    assert mc(0, batch_size=5) == pytest.approx(mc(0), abs=1e-5)
    assert mc(0) != mc(1)
    mean = sum(mc(s) for s in range(8)) / 8
    assert mean == pytest.approx(exact, rel=0.05)


def test_is_greedy_is_llada_greedy_unmasking(checkpoints, tokenizer):
    lm = _lm(checkpoints["dream", "fp"])
    context = tokenizer("def forward(self, x):")["input_ids"]
    # the greedy answer by hand: each step commits the most confident masked position
    n, mask = 3, lm.spec.mask_token_id
    state = context + [mask] * n
    for _ in range(n):
        log_p = _reference_logprobs(lm.model, state)[len(context) :]
        masked = [i for i in range(n) if state[len(context) + i] == mask]
        best = max(masked, key=lambda i: float(log_p[i].max()))
        state[len(context) + best] = int(log_p[best].argmax())
    answer = state[len(context) :]
    other = [answer[0], answer[1], (answer[2] + 1) % mask or 3]
    results = lm._loglikelihood_tokens([(("", ""), context, answer), (("", ""), context, other)])
    assert [greedy for _, greedy in results] == [True, False]


def test_rolling_loglikelihood_sums_disjoint_windows(checkpoints, tokenizer):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    path = checkpoints["llada", "fp"]
    lm = _lm(path, max_length=6, mc_samples=32)
    text = "def f(x):\n    return x + 1\n"
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = tokenizer(text)["input_ids"]
    windows = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, tokenizer.eos_token_id, 5, 1)
    ]
    assert len(windows) > 1 and sum(len(cont) for _, cont in windows) == len(tokens)
    assert all(len(ctx) + len(cont) <= 6 for ctx, cont in windows)
    expected = sum(_exact_elbo(lm.model, ctx, cont) for ctx, cont in windows)
    assert total == pytest.approx(expected, abs=1e-3)


def test_generation_stops_at_the_first_stop_string_and_batches_exactly(checkpoints):
    lm = _lm(checkpoints["llada", "w4a4"], batch_size=1)
    prompts = ["import torch\n", "class A(", "def f(", "x = "]  # tokenized lengths differ

    def generate(model, until):
        requests = [
            Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 8}), i)
            for i, p in enumerate(prompts)
        ]
        return model.generate_until(requests, disable_tqdm=True)

    free = generate(lm, [])
    batched = _lm(checkpoints["llada", "w4a4"], batch_size=4)
    assert generate(batched, []) == free
    stop = next(a[2:4] for a in free if len(a) >= 4)
    cut = generate(lm, [stop])
    for full, short in zip(free, cut, strict=True):
        assert short == (full[: full.index(stop)] if stop in full else full)


def test_bad_model_args_fail_before_any_request(checkpoints):
    with pytest.raises(ValueError, match="block_length"):
        _lm(checkpoints["dream", "fp"], block_length=8)
    with pytest.raises(ValueError, match="multiple of block_length"):
        _lm(checkpoints["llada", "fp"], gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="batch_size='auto'"):
        _lm(checkpoints["llada", "fp"], batch_size="auto")


def test_shell_entry_point_runs_lm_eval_cli(checkpoints, in_repo, tmp_path, capsys):
    from fair_calib_llmc.evaluation.harness import main

    main(
        [
            "--model",
            "dllm",
            "--model_args",
            f"pretrained={checkpoints['dream', 'w4a4']},mc_samples=8",
            "--device",
            "cpu",
            "--tasks",
            "tiny_dllm_choice",
            "--include_path",
            str(TASKS),
            "--limit",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert "tiny_dllm_choice" in capsys.readouterr().out
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_nvfp4_fp32_checkpoint_scores_like_the_model_that_was_saved(tokenizer, tmp_path):
    """compressed-tensors decompresses FP4 to bf16; the harness loads it exactly anyway."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from fair_calib_llmc.io.checkpoint import save_atomically

    model = sharpen(LLaDAModelLM(llada_config(tokenizer)), seed=5)
    fp_dir = save_with_tokenizer(model, tokenizer, tmp_path / "fp")
    texts = ["def forward(self, x):\n    return self.proj(x)\n" * 3] * 4
    model = oneshot(
        model=AutoModel.from_pretrained(fp_dir, dtype=torch.float32),
        processor=tokenizer,
        dataset=Dataset.from_dict({"text": texts}),
        max_seq_length=32,
        recipe=QuantizationModifier(scheme="NVFP4", targets=["Linear"], ignore=[LM_HEAD]),
    )
    context, continuation = [5, 9, 31, 7], [40, 41, 42]
    # batch_size=1 as the harness: another batching sums the same float64 terms in another
    # order, equal only by chance (the test tokenizer, and so the model, follow the sources)
    expected = masked_diffusion_loglikelihood(
        model, context, continuation, batch_size=1, spec=diffusion_spec(model)
    )
    path = save_atomically(model, tokenizer, tmp_path / "nvfp4")
    lm = _lm(path, dtype="float32", greedy_check=False)
    assert lm.model.model.transformer.blocks[0].q_proj.weight.dtype == torch.float32
    assert lm._loglikelihood_tokens([(("", ""), context, continuation)])[0][0] == expected


def test_shell_entry_point_without_pretrained_is_one_line(capsys):
    from fair_calib_llmc.evaluation.harness import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "dllm", "--tasks", "tiny_dllm_choice", "--include_path", str(TASKS)])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after lm-eval's own log lines
    assert last.startswith("lm-eval-dllm: error: the dllm model needs a checkpoint: pass ")
    assert "--model_args pretrained=DIR" in last


def test_shipped_tasks_load_from_any_directory_without_warnings(tmp_path, monkeypatch, caplog):
    """Their data paths used to be relative to the repository root, and the perplexity task
    warned about every metric's missing aggregation on each run."""
    from fair_calib_llmc.evaluation import LM_EVAL_TASKS

    monkeypatch.chdir(tmp_path)
    names = ["python_next_line", "python_next_line_choice", "python_heldout_ppl"]
    with caplog.at_level(logging.WARNING):
        manager = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)
        tasks = manager.load_task_or_group(names)
    assert sorted(tasks) == sorted(names)
    assert all(len(list(task.test_docs())) > 0 for task in tasks.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


def test_shell_entry_point_finds_the_shipped_tasks_from_anywhere(
    checkpoints, tmp_path, monkeypatch, capsys
):
    from fair_calib_llmc.evaluation.harness import main

    monkeypatch.chdir(tmp_path)
    model_args = f"pretrained={checkpoints['llada', 'fp']},mc_samples=4"
    argv = ["--model", "dllm", "--model_args", model_args, "--device", "cpu"]
    main([*argv, "--tasks", "python_next_line_choice", "--limit", "2"])
    assert "python_next_line_choice" in capsys.readouterr().out


def _count_forwards(model) -> list:
    calls: list = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _other_token(token: int, spec, vocab_size: int) -> int:
    token = (token + 1) % vocab_size
    return token if token != spec.mask_token_id else (token + 1) % vocab_size


def test_greedy_check_stops_at_the_first_wrong_commit_with_the_full_runs_answer(
    checkpoints, tokenizer
):
    """The check ends one forward pass after a wrong commit (a committed token never changes)
    and answers as the full run; the scores are the likelihood's own, to the last digit."""
    from fair_calib_llmc.sampling.samplers import LLaDASampler

    n, mc = 6, 8  # 63 masks > mc: the Monte-Carlo branch, one forward pass of mc rows
    lm = _lm(checkpoints["llada", "w4a4"], mc_samples=mc, batch_size=mc)
    forwards = _count_forwards(lm.model)
    vocab = lm.model.config.vocab_size
    sampler = LLaDASampler(steps=n, gen_length=n, block_length=n)
    for text in ("def forward(self, x):", "import torch\n", "class A("):
        context = tokenizer(text)["input_ids"]
        trace = sampler.generate(lm.model, torch.tensor(context), spec=lm.spec)
        answer = trace.generated[0].tolist()
        order = [int(trace.committed[s, 0, len(context) :].nonzero()) for s in range(n)]
        wrong_first, wrong_last = list(answer), list(answer)
        wrong_first[order[0]] = _other_token(answer[order[0]], lm.spec, vocab)
        wrong_last[order[-1]] = _other_token(answer[order[-1]], lm.spec, vocab)
        for continuation, greedy, passes in (
            (answer, True, 1 + n),
            (wrong_first, False, 1 + 2),  # the wrong commit is seen at the next step's hook
            (wrong_last, False, 1 + n),
        ):
            forwards.clear()
            ((log_p, is_greedy),) = lm._loglikelihood_tokens([(("", ""), context, continuation)])
            assert (is_greedy, len(forwards)) == (greedy, passes)
            assert log_p == masked_diffusion_loglikelihood(
                lm.model,
                context,
                continuation,
                spec=lm.spec,
                mc_samples=mc,
                batch_size=mc,
                seed=lm.seed,
            )


def test_a_w4a4_checkpoint_decompresses_once_and_fake_quantizes_only_activations(
    checkpoints, monkeypatch
):
    """The cheap W4A4 path: weights decompressed once at load, never re-quantized per forward
    pass; only the deployed model's dynamic input-activation quantization runs per call."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization.lifecycle import forward as ct_forward

    decompress = ModelCompressor.decompress_model
    decompressions: list = []
    monkeypatch.setattr(
        ModelCompressor,
        "decompress_model",
        lambda self, *a, **k: decompressions.append(1) or decompress(self, *a, **k),
    )
    quantize = ct_forward.forward_quantize
    quantized: list[str] = []
    monkeypatch.setattr(
        ct_forward,
        "forward_quantize",
        lambda module, value, base_name, args: (
            quantized.append(base_name) or quantize(module, value, base_name, args)
        ),
    )
    lm = _lm(checkpoints["llada", "w4a4"], mc_samples=8, batch_size=8, greedy_check=False)
    assert len(decompressions) == 1
    linears = [m for m in lm.model.modules() if getattr(m, "quantization_scheme", None)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)
    forwards = _count_forwards(lm.model)
    quantized.clear()
    lm._loglikelihood_tokens([(("", ""), [5, 9, 31, 7], [40, 41, 42, 43, 44, 45])])
    assert len(decompressions) == 1
    assert len(forwards) == 1 and quantized == ["input"] * len(linears)
