"""Runs tasks x lengths x modes x methods on one model and appends a row per finished case.

For every case: the context goes through the method's cache, then the question is
decoded after it (mode "after"; "inside" prefills both together and is reported
separately); greedy decoding; the row records the real bytes the cache holds at the end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .case import KIND_AGREEMENT, KIND_LM, Case
from .decode import MODE_AFTER, MODES, greedy_answer, lm_metrics, reference_log_probs, teacher_forced, cut_at_stop
from .environment import environment
from .methods import DynamicCacheMethod, Method, MethodSpec, MethodUnavailable, resolve
from .results import STATUS_ERROR, STATUS_OK, ResultStore, fingerprint
from .scoring import agreement, score
from .tasks import DEFAULT_DEPTHS, TASKS, expand


@dataclass
class EvalConfig:
    tasks: list[str]
    lengths: list[int]
    methods: list[str]
    out_dir: Path
    seed: int = 0
    modes: list[str] = field(default_factory=lambda: [MODE_AFTER])
    count: int | None = None  # cases per (task, length); None = each task's default
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    model_name: str = "unknown"
    shard: tuple[int, int] = (0, 1)  # (k, n): this process runs the cases whose index % n == k

    def __post_init__(self) -> None:
        k, n = self.shard
        if n < 1 or not 0 <= k < n:
            raise ValueError(f"shard must be k/n with n >= 1 and 0 <= k < n, got {k}/{n}")
        self.tasks = expand(self.tasks)
        self.out_dir = Path(self.out_dir)
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of token counts >= 64, got {self.lengths}")
        self.lengths = [int(n) for n in self.lengths]
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")


def _restore_attention(model, implementation: str | None) -> None:
    """zipkv caches switch the model to their attention function; the next method must
    start from the model as loaded."""
    if implementation is None or getattr(model.config, "_attn_implementation", None) == implementation:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = implementation


class Runner:
    def __init__(
        self, model, tokenizer, config: EvalConfig, *, resolver: Callable[[MethodSpec], Method] = resolve,
        progress: Any = None, log: Callable[[str], None] = print,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.store = ResultStore(config.out_dir)
        self.refs = ResultStore(config.out_dir, "references.jsonl")
        self.log = log
        self.progress = progress
        self.env = environment(model)
        self.attn = getattr(model.config, "_attn_implementation", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {i for i in ([eos] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])) if i is not None}
        self.methods: list[Method] = []
        for text in config.methods:
            spec = text if isinstance(text, MethodSpec) else MethodSpec.parse(text)
            try:
                self.methods.append(resolver(spec))
            except MethodUnavailable as e:
                self.log(f"skipping method {spec.label}: {e}")
        if not self.methods:
            raise ValueError("none of the requested methods is available: " + ", ".join(map(str, config.methods)))
        self.reference = DynamicCacheMethod()

    # ---- planning -------------------------------------------------------------------------
    def cases(self) -> list[Case]:
        out = []
        for task in self.config.tasks:
            for length in self.config.lengths:
                out += TASKS[task].cases(self.tokenizer, length, self.config.seed, self.config.count, self.config.depths)
        k, n = self.config.shard
        return [case for i, case in enumerate(out) if i % n == k]

    def _modes(self, case: Case) -> list[str]:
        return [MODE_AFTER] if case.kind == KIND_LM else list(self.config.modes)

    def _ids(self, case: Case) -> tuple[list[int], list[int]]:
        if case.context_ids is not None:
            return list(case.context_ids), list(case.target_ids or [])
        ctx = list(self.tokenizer(case.context, add_special_tokens=True)["input_ids"])
        q = list(self.tokenizer(case.question, add_special_tokens=False)["input_ids"])
        return ctx, q

    def key(self, case: Case, case_fp: str, mode: str, method: Method) -> str:
        return fingerprint(self.config.model_name, case.case_id, self.config.seed, case_fp, mode, method.label)

    # ---- running --------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        done = self.store.done_keys()
        cases = self.cases()
        total = sum(len(self._modes(c)) for c in cases) * len(self.methods)
        task_id = self.progress.add_task("eval", total=total) if self.progress else None
        finished = skipped = 0
        for case in cases:
            ctx, q = self._ids(case)
            case_fp = fingerprint(ctx, q, case.answers, case.max_new_tokens, list(case.stop))
            lm_reference = None
            for mode in self._modes(case):
                for method in self.methods:
                    key = self.key(case, case_fp, mode, method)
                    if self.progress:
                        self.progress.update(task_id, description=f"{case.task} {case.length} {mode} {method.label}")
                    if key in done:
                        skipped += 1
                    else:
                        if case.kind == KIND_LM and lm_reference is None:
                            lm_reference = reference_log_probs(self.model, ctx, q)
                        row = self._run_one(case, ctx, q, mode, method, key, lm_reference)
                        self.store.append(row)
                        finished += 1
                    if self.progress:
                        self.progress.advance(task_id)
        self.log(f"{finished} cases run, {skipped} already in {self.store.path}")
        return self.store.latest()

    def _run_one(self, case, ctx, q, mode, method, key, lm_reference) -> dict[str, Any]:
        row: dict[str, Any] = {
            "key": key, "task": case.task, "family": TASKS[case.task].family, "case_id": case.case_id,
            "index": case.index, "length": case.length, "context_tokens": len(ctx), "question_tokens": len(q),
            "depth": case.depth, "mode": mode, "method": method.spec.name, "params": method.spec.params,
            "method_label": method.label, "model": self.config.model_name, "seed": self.config.seed, **self.env,
            "meta": case.meta,
        }
        start = time.perf_counter()
        try:
            row.update(self._measure(case, ctx, q, mode, method, lm_reference))
            row["status"] = STATUS_OK
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one broken method or case must not end the run
            row.update(status=STATUS_ERROR, error=f"{type(e).__name__}: {e}", score=None)
            self.log(f"error in {case.case_id} {mode} {method.label}: {type(e).__name__}: {e}")
        finally:
            _restore_attention(self.model, self.attn)
        row["seconds"] = time.perf_counter() - start
        row["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return row

    def _measure(self, case, ctx, q, mode, method, lm_reference) -> dict[str, Any]:
        if case.kind == KIND_LM:
            forced = teacher_forced(self.model, method, ctx, q)
            metrics = lm_metrics(forced.log_probs, lm_reference, q)
            stats = method.stats(forced.cache, self.model.config, forced.tokens_seen)
            return {
                "score": metrics["top1_agreement"], "metrics": metrics, "prefill_seconds": forced.prefill_seconds,
                "decode_seconds": forced.decode_seconds, "tokens_seen": forced.tokens_seen, **_stat_fields(stats),
            }
        out = greedy_answer(
            self.model, self.tokenizer, method, ctx, q, max_new_tokens=case.max_new_tokens, stop=case.stop,
            mode=mode, eos_ids=self.eos_ids,
        )
        stats = method.stats(out.cache, self.model.config, out.tokens_seen)
        tokens = [t for t in out.tokens if t not in self.eos_ids]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if case.kind == KIND_AGREEMENT:
            ref = self._reference_tokens(case, ctx, q, mode)
            value, metrics = agreement(tokens, ref)
            prediction = text
        else:
            prediction = cut_at_stop(text, case.stop) if case.stop else text.strip()
            value, metrics = score(case.scorer, prediction, case.answers)
        return {
            "score": value, "metrics": metrics, "prediction": prediction, "answers": case.answers,
            "prefill_seconds": out.prefill_seconds, "decode_seconds": out.decode_seconds,
            "tokens_seen": out.tokens_seen, "generated_tokens": len(out.tokens), **_stat_fields(stats),
        }

    def _reference_tokens(self, case, ctx, q, mode) -> list[int]:
        """The full cache's greedy tokens for this case, computed once and kept on disk."""
        key = fingerprint(self.config.model_name, case.case_id, ctx, q, mode, case.max_new_tokens, self.env["dtype"])
        for row in self.refs.rows():
            if row.get("key") == key:
                return row["tokens"]
        out = greedy_answer(
            self.model, self.tokenizer, self.reference, ctx, q, max_new_tokens=case.max_new_tokens,
            mode=mode, eos_ids=self.eos_ids,
        )
        tokens = [t for t in out.tokens if t not in self.eos_ids]
        self.refs.append({"key": key, "case_id": case.case_id, "mode": mode, "tokens": tokens, "status": STATUS_OK})
        return tokens


def _stat_fields(stats: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in stats.items() if k not in ("bytes_held", "fp16_bytes", "ratio")}
    return {
        "bytes_held": float(stats["bytes_held"]), "fp16_bytes": float(stats["fp16_bytes"]),
        "ratio": float(stats["ratio"]), "cache_stats": extra,
    }
