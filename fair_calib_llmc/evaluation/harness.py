"""lm-evaluation-harness model ``dllm``: any LLaDA / Dream checkpoint, FP or compressed.

Usage (shell; lm-eval 0.4.x has no plugin discovery, so this module's ``main`` registers the
model and then runs lm-eval's own command line, arguments unchanged)::

    python -m fair_calib_llmc.evaluation.harness --model dllm \\
        --model_args pretrained=DIR,dtype=bfloat16,steps=64,gen_length=64 --tasks gsm8k

or ``lm-eval-dllm ...`` (the same, installed as a script), or from Python after
``import fair_calib_llmc``::

    lm_eval.simple_evaluate(model="dllm", model_args={"pretrained": DIR}, tasks=[...])

The three request types, as the LLaDA / Dream authors evaluate:

* ``generate_until``: the family's own sampler (:mod:`fair_calib_llmc.sampling.samplers`; LLaDA:
  ``steps``, ``block_length``, ``remasking``; Dream: ``steps``, ``alg``, ``alg_temp``,
  ``top_p``, ``top_k``; both: ``temperature``) writes ``gen_length`` tokens (default: the
  task's ``max_gen_toks``); the answer is cut at the first end-of-text token and then at the
  first stop string. Prompts of equal token length are batched (``batch_size`` rows), so
  greedy answers do not depend on the batch size.
* ``loglikelihood``: LLaDA's masked-diffusion bound on ``log p(continuation | context)``
  (:func:`fair_calib_llmc.evaluation.metrics.masked_diffusion_loglikelihood`, the one the
  ELBO perplexity uses too):
  only continuation tokens are masked; the number masked, ``l``, is stratified over
  ``1..T`` and each sample scores ``(T / l) * sum log p(x_i | masked)`` (``mc_samples``
  samples, ``batch_size`` per forward pass, seeded per request so a score never depends on
  batch size or request order). When all ``2**T - 1`` masks fit in ``mc_samples``, the
  expectation is computed exactly instead (short answers such as " A" or " yes").
  ``is_greedy`` is LLaDA's check: unmask the continuation one token per step, most confident
  first, greedily, and compare with the target (stopped at the first wrong commit, which
  decides the answer).
* ``loglikelihood_rolling``: the same bound over lm-eval's disjoint rolling windows of
  ``max_length`` tokens, summed.

``pretrained`` is a checkpoint directory (full precision or compressed-tensors, loaded with
:func:`fair_calib_llmc.io.reload.load_quantized`, which reproduces the saved model exactly in fp32
and bf16) or an in-memory model (then pass ``tokenizer``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fair_calib_llmc.evaluation import LM_EVAL_MODEL_NAME, LM_EVAL_TASKS
from fair_calib_llmc.evaluation.metrics import masked_diffusion_loglikelihood
from fair_calib_llmc.io.loading import default_device, resolve_dtype
from fair_calib_llmc.io.reload import load_quantized, restore_decompressed
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.models.registry import sampler_classes
from fair_calib_llmc.sampling.samplers import (
    LLaDASampler,
    sampler_for,
    sampler_settings,
)

__all__ = ["DiffusionHarnessLM", "ModelArgumentError", "masked_diffusion_loglikelihood", "main"]

#: sampler fields a request decides (``gen_length``) or that are not settings of the sampling
_NOT_MODEL_ARGS = {"family", "gen_length", "show_progress"}
#: family -> the sampler settings its model arguments may set: the sampler class's own fields
_SAMPLER_KEYS = {
    sampler.model_fields["family"].default: tuple(
        name for name in sampler.model_fields if name not in _NOT_MODEL_ARGS
    )
    for sampler in sampler_classes()
}


class ModelArgumentError(ValueError):
    """A wrong ``--model_args`` for ``dllm``: :func:`main` prints it as one line."""


class _WrongCommit(Exception):
    """Raised by :meth:`DiffusionHarnessLM._is_greedy`'s step hook to end a greedy check
    whose answer is already decided (never leaves the class)."""


@register_model(LM_EVAL_MODEL_NAME)
class DiffusionHarnessLM(TemplateLM):
    """lm-eval model for masked-diffusion LMs (LLaDA, Dream); see the module docstring.

    :param pretrained: checkpoint directory, or an in-memory LLaDA / Dream model
    :param tokenizer: tokenizer directory or object (default: ``pretrained``)
    :param dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``
    :param device: ``cuda``, ``cuda:N``, ``cpu`` (default: cuda when available)
    :param batch_size: sequences per forward pass (prompts for generation, masked copies
        for likelihoods)
    :param max_length: context window (default: the config's ``max_position_embeddings``)
    :param gen_length: answer tokens written by the sampler (default: the task's
        ``max_gen_toks``)
    :param steps: sampler steps (default: ``gen_length``, one token per step)
    :param block_length: LLaDA's semi-autoregressive block (default: ``gen_length``)
    :param remasking: LLaDA's ``low_confidence`` or ``random``
    :param alg: Dream's ``origin``, ``maskgit_plus``, ``topk_margin`` or ``entropy``
    :param temperature: 0 = greedy; a task's ``do_sample: true`` + ``temperature`` overrides
    :param mc_samples: Monte-Carlo samples per likelihood (LLaDA's ``mc_num``, 128)
    :param greedy_check: compute ``is_greedy`` (up to one forward pass per continuation
        token, at batch size 1; a wrong commit ends it)
    :param seed: seeds likelihood masks and sampler noise
    :param mask_token_id: override the config's mask token (e.g. 126336 for LLaDA-8B)
    :param add_bos_token: passed to the tokenizer as ``add_special_tokens`` (default: the
        tokenizer's own behaviour)
    """

    backend = "causal"  # context and continuation are tokenized together, then split

    def __init__(
        self,
        pretrained: str | nn.Module | None = None,
        tokenizer=None,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: str | None = None,
        alg: str | None = None,
        alg_temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        eps: float | None = None,
        temperature: float = 0.0,
        mc_samples: int = 128,
        greedy_check: bool = True,
        seed: int = 1234,
        mask_token_id: int | None = None,
        add_bos_token: bool | None = None,
    ) -> None:
        super().__init__()
        if pretrained is None:
            raise ModelArgumentError(
                "the dllm model needs a checkpoint: pass --model_args pretrained=DIR (a LLaDA or "
                "Dream checkpoint directory, full precision or compressed)"
            )
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ModelArgumentError(
                f"batch_size={batch_size!r} is not supported by the dllm model; pass an "
                "integer (sequences per forward pass)"
            )
        self._batch_size = int(batch_size or 1)
        if self._batch_size < 1 or int(mc_samples) < 1:
            raise ModelArgumentError("batch_size and mc_samples must be positive integers")
        device = device or default_device()
        self._device = torch.device(device)

        if isinstance(pretrained, nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with an in-memory model")
            self.model = pretrained
            restore_decompressed(self.model)  # e.g. a model that was just saved compressed
            if dtype not in (None, "auto"):
                self.model = self.model.to(resolve_dtype(dtype or "auto"))
        else:
            self.model = load_quantized(
                pretrained, dtype=resolve_dtype(dtype or "auto"), device=self._device
            )
        self.model = self.model.to(self._device).eval()
        if isinstance(tokenizer, str) or tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or pretrained)
        self.tokenizer = tokenizer
        # computed once, passed to every likelihood and sampler call; an explicit
        # mask_token_id lives in the spec only (the model's config stays as loaded)
        self.spec = diffusion_spec(
            self.model, tokenizer, mask_token_id=mask_token_id
        )  # a causal LM fails here, clearly
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.gen_length = gen_length
        self.temperature = float(temperature)
        self.mc_samples = int(mc_samples)
        self.greedy_check = bool(greedy_check)
        self.seed = int(seed)
        self.add_bos_token = add_bos_token
        given = dict(
            steps=steps,
            block_length=block_length,
            remasking=remasking,
            alg=alg,
            alg_temp=alg_temp,
            top_p=top_p,
            top_k=top_k,
            eps=eps,
        )
        given = {k: v for k, v in given.items() if v is not None}
        wrong = sorted(set(given) - set(_SAMPLER_KEYS[self.spec.family]))
        if wrong:
            raise ModelArgumentError(
                f"{wrong} are not {self.spec.family} sampler settings; "
                f"{self.spec.family} takes {list(_SAMPLER_KEYS[self.spec.family])}"
            )
        self.sampler_settings = given
        if gen_length is not None:
            self._sampler(int(gen_length), self.temperature)  # bad settings fail before work

    # --- what TemplateLM needs ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.model.config.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if special is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # --- likelihoods --------------------------------------------------------------------------
    def _score(self, context: list[int], continuation: list[int]) -> float:
        if len(continuation) > self.max_length - 1:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_length="
                f"{self.max_length}; raise max_length or shorten the task's targets"
            )
        context = context[-(self.max_length - len(continuation)) :]
        return masked_diffusion_loglikelihood(
            self.model,
            context,
            continuation,
            spec=self.spec,
            mc_samples=self.mc_samples,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """LLaDA's check: one token per step, most confident first, greedy, equals target?

        A committed token is never changed, so the first committed token that differs from
        the target decides ``False``: the sampler's step hook stops the run there instead of
        unmasking the rest (one forward pass per step; a weak or quantized model usually
        misses within the first steps). The answer is the one of the full run."""
        n = len(continuation)
        sampler = LLaDASampler(steps=n, gen_length=n, block_length=n)
        prompt = torch.tensor(context[-(self.max_length - n) :], dtype=torch.long).unsqueeze(0)
        target = torch.tensor(continuation, dtype=torch.long, device=self.device)
        start = prompt.shape[1]

        def stop_at_a_wrong_commit(step: int, state: torch.Tensor, logits) -> None:
            answer = state[0, start:]
            committed = answer != self.spec.mask_token_id
            if not torch.equal(answer[committed], target[committed]):
                raise _WrongCommit

        try:
            trace = sampler.generate(
                self.model, prompt, spec=self.spec, on_step=stop_at_a_wrong_commit
            )
        except _WrongCommit:
            return False
        return trace.generated[0].tolist() == list(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = []
        for text_pair, context, continuation in tqdm(
            requests, desc="dllm loglikelihood", disable=disable_tqdm or self.rank != 0
        ):
            log_p = self._score(context, continuation)
            greedy = self.greedy_check and self._is_greedy(context, continuation)
            results.append((log_p, greedy))
            self.cache_hook.add_partial("loglikelihood", text_pair, (log_p, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(
            requests, desc="dllm loglikelihood_rolling", disable=disable_tqdm or self.rank != 0
        ):
            (text,) = request.args
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,  # all window tokens are model inputs
                    context_len=1,
                ),
            )
            total = sum(self._score(ctx, cont) for ctx, cont in windows)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # --- generation ---------------------------------------------------------------------------
    def _sampler(self, gen_length: int, temperature: float):
        overrides = {"temperature": temperature, **self.sampler_settings}
        settings = sampler_settings(self.spec, gen_length, **overrides)
        try:
            return sampler_for(self.spec, **settings)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise ModelArgumentError(
                f"dllm sampler settings {settings} are invalid: {error}"
            ) from None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.gen_length or 256)
            gen_length = int(self.gen_length or kwargs["max_gen_toks"])
            do_sample = kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0
            temperature = float(kwargs["temperature"]) if do_sample else self.temperature
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            if gen_length >= self.max_length:
                raise ValueError(
                    f"gen_length={gen_length} leaves no room for a prompt in max_length="
                    f"{self.max_length}; lower gen_length / the task's max_gen_toks"
                )
            prompt = self.tok_encode(context)[-(self.max_length - gen_length) :]
            prepared.append((prompt, until, gen_kwargs))
            groups[(len(prompt), gen_length, temperature)].append(index)

        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(
            total=len(requests),
            desc="dllm generate_until",
            disable=disable_tqdm or self.rank != 0,
        )
        for (_, gen_length, temperature), indices in groups.items():
            sampler = self._sampler(gen_length, temperature)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = torch.tensor([prepared[i][0] for i in chunk], dtype=torch.long)
                trace = sampler.generate(self.model, prompts, seed=self.seed, spec=self.spec)
                for i, tokens in zip(chunk, trace.generated.tolist(), strict=True):
                    prompt, until, gen_kwargs = prepared[i]
                    answers[i] = self._finish(tokens, until)
                    self.cache_hook.add_partial(
                        "generate_until", (requests[i].args[0], gen_kwargs), answers[i]
                    )
                bar.update(len(chunk))
        bar.close()
        return answers

    def _finish(self, tokens: list[int], until: list[str]) -> str:
        """Cut at the first end-of-text token, decode, then cut at the first stop string."""
        if self.eot_token_id in tokens:
            tokens = tokens[: tokens.index(self.eot_token_id)]
        return postprocess_generated_text(self.tok_decode(tokens), until, None)

    def get_model_info(self) -> dict:
        quantization = getattr(self.model.config, "quantization_config", None)
        if hasattr(quantization, "to_dict"):
            quantization = quantization.to_dict()
        return {
            "model_family": self.spec.family,
            "model_dtype": str(self.model.dtype),
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "quantization_config": quantization,
        }


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line with ``--model dllm`` available and the shipped tasks
    (:data:`~fair_calib_llmc.evaluation.LM_EVAL_TASKS`) on the include path, unless the
    command names another ``--include_path`` (lm-eval takes one)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    import fair_calib_llmc  # noqa: F401  (model classes, registration)

    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(LM_EVAL_TASKS)]
    sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ModelArgumentError as err:
        print(f"lm-eval-dllm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
