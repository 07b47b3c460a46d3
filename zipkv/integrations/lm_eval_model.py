"""ZipkvLM: lm-eval's HFLM with a fresh zipkv cache for every request (imports lm_eval).

How the cache is used, as `zipkv eval`'s "after" mode does:
- loglikelihood (multiple choice, loglikelihood_rolling): the context (lm-eval's prompt,
  left-truncated to max_length like HFLM) is prefilled through a fresh cache, which compresses
  it; the continuation is then one more forward on top of the compressed cache (or one forward
  per token with stepwise=true), so every continuation token attends to the compressed
  context. Requests run one at a time (batch_size does not apply); with method=full the
  log-likelihoods equal HFLM's uncached ones. For loglikelihood_rolling (perplexity tasks)
  lm-eval makes the context one prefix token and the whole window the continuation, so only
  what the method compresses inside that forward (stepwise=true: while decoding) matters.
- generate_until: HFLM's batched generate() with a fresh cache per call (one cache holds the
  batch of left-padded prompts): the prompt is prefilled and compressed, every generated
  token reads the compressed cache.
After each request the cache's stats() (bytes really held vs fp16 bytes of the same tokens)
are summed; `compression_report()` returns them and lm-eval's results carry them under
config["zipkv"].
"""

from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..methods import make_cache
from ..models import load_model, parse_device, parse_dtype
from ..transformers_support import cache_kwargs
from .lm_eval import DEFAULT_METHOD, split_model_args

# A child of lm-eval's logger, so its handlers (and --verbosity) apply.
logger = logging.getLogger("lm_eval.models.zipkv")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """lm-eval's dtype=auto means the checkpoint's; zipkv's loaders give float32 weights, so
    auto is float32 on a CPU and bfloat16 on CUDA."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return parse_dtype(dtype)
    except ValueError as error:
        raise ValueError(f"model_args: {error} (or auto)") from None


class ZipkvLM(HFLM):
    """lm-eval model type `zipkv` (see zipkv/integrations/lm_eval.py for its model_args)."""

    def __init__(self, pretrained="default", method: str = DEFAULT_METHOD, gguf_file=None, dtype="auto",
                 device=None, stepwise: bool = False, **model_args):
        own, hflm, self.method, self.method_params = split_model_args(
            {"method": method, "stepwise": stepwise, **model_args})
        self.stepwise = own["stepwise"]
        if device in (None, ""):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = parse_device(device)
        except ValueError as error:
            raise ValueError(f"model_args: {error}") from None
        dtype = resolve_dtype(dtype, device)
        model, tokenizer = load_model(str(pretrained), dtype=dtype, device=device, gguf_file=gguf_file,
                                      argument="pretrained")
        make_cache(self.method, model.config, **self.method_params)  # a model-dependent error fails here, once
        self.totals = {"caches": 0, "bytes_held": 0, "fp16_bytes": 0}
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **hflm)
        self.pretrained_name = str(pretrained)

    # ---- the cache ------------------------------------------------------------------------

    def new_cache(self):
        return make_cache(self.method, self.model.config, **self.method_params)

    def count(self, cache) -> None:
        stats = cache.stats()
        self.totals["caches"] += 1
        self.totals["bytes_held"] += int(stats.bytes_held)
        self.totals["fp16_bytes"] += int(stats.fp16_bytes)

    def compression_report(self) -> dict:
        """The method and, summed over every request so far, the bytes its caches held at the
        end of the request and the fp16 bytes of the same tokens; ratio = fp16 / held."""
        held, fp16 = self.totals["bytes_held"], self.totals["fp16_bytes"]
        return {"method": self.method, "method_params": dict(self.method_params), "stepwise": self.stepwise,
                **self.totals, "ratio": fp16 / held if held else None}

    def get_model_info(self) -> dict:
        # HFLM's asks the hub for a revision hash; zipkv's models are local.
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                "pretrained": self.pretrained_name, "zipkv": self.compression_report()}

    # ---- loglikelihood ---------------------------------------------------------------------

    def _forward(self, cache, ids: list[int], start: int, keep: int) -> torch.Tensor:
        """Logits [len(ids) or keep, vocab] of ids fed at positions start.. on top of cache;
        explicit positions, so a cache that dropped tokens shifts nothing."""
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=keep,
                             **cache_kwargs(cache))
        return out.logits[0]

    @torch.inference_mode()
    def score_continuation(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding gives it), the
        context compressed by a fresh cache before the continuation is fed."""
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs a non-empty context and continuation")
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens > max_length={self.max_length}")
        tokens = (context + continuation)[-(self.max_length + 1):]  # HFLM's left truncation
        prefix = tokens[:-len(continuation)]
        cache = self.new_cache()
        rows = [self._forward(cache, prefix, 0, keep=1)]
        fed = continuation[:-1]
        if self.stepwise:
            rows += [self._forward(cache, [token], len(prefix) + i, keep=1) for i, token in enumerate(fed)]
        elif fed:
            rows.append(self._forward(cache, fed, len(prefix), keep=0))
        log_probs = torch.log_softmax(torch.cat(rows).to(self.softmax_dtype or torch.float32), dim=-1)
        target = torch.tensor(continuation, device=log_probs.device)
        self.count(cache)
        return float(log_probs.gather(1, target[:, None]).sum()), bool((log_probs.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        results = []
        for request_str, context, continuation in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                       desc=f"loglikelihood with a {self.method} cache"):
            answer = self.score_continuation(list(context), list(continuation))
            results.append(answer)
            if request_str is not None:  # rolling windows come without a key (HFLM adds those itself)
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.reported(super().loglikelihood(requests, disable_tqdm=disable_tqdm))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.reported(super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.reported(super().generate_until(requests, disable_tqdm=disable_tqdm))

    def reported(self, results):
        """results, once the bytes held so far are logged (lm-eval's results also carry them)."""
        logger.info("zipkv cache %s", self.compression_report())
        return results

    # ---- generate_until --------------------------------------------------------------------

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        cache = self.new_cache()
        out = super()._model_generate(context, max_length, stop, **generation_kwargs, **cache_kwargs(cache))
        self.count(cache)
        return out
