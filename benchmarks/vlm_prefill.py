"""GPU benchmark: prefill time, peak memory and cache bytes of zipkv's VLM caches against
full attention (DynamicCache), at real VLM language shapes with random weights.

    python3 -m benchmarks.vlm_prefill --shape llava-1.5-7b --visual 576,2304,9216,16384 --out $OUT

The language model runs at its real width with `--layers` decoder layers (per-layer costs
scale with the layer count); prompts are `--text` text tokens, the visual span, and the
same number of text tokens again, batch 1, fp16. What is timed is the language model's
prefill of the whole prompt (the vision tower is not the subject) and one decode step after
it; the median of `--reps` runs after a warm-up. Peak memory is the largest allocation above
what was allocated before the forward (weights, inputs). Writes JSON with the command and
the device, the benchmark suite's format.

zipkv's prefill attends in full precision (SDPA) and then scores (probe queries) and
quantizes; ZipVL's sparse prefill is not used here, so prefill is not expected to be faster
than full attention; the cache after it is smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import zipkv

SHAPES = {
    # language model of llava-hf/llava-1.5-7b-hf (Vicuna-7B, Llama architecture)
    "llava-1.5-7b": dict(family="llava", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064),
    # language model of Qwen/Qwen2-VL-7B-Instruct
    "qwen2-vl-7b": dict(family="qwen2_vl", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064),
}
IMAGE_ID = 1000


def build(shape: str, layers: int, device, dtype):
    import transformers as tf

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    text = dict(spec, num_hidden_layers=layers, max_position_embeddings=32768)
    if family == "llava":
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14),
            text_config=tf.LlamaConfig(**text), image_token_id=IMAGE_ID,
        )
        model_class = tf.LlavaForConditionalGeneration
    else:
        text["rope_parameters"] = dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])
        config = tf.Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
            image_token_id=IMAGE_ID, video_token_id=IMAGE_ID + 1,
        )
        model_class = tf.Qwen2VLForConditionalGeneration
    config.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = model_class(config).to(dtype).eval()
    return model


def make(method: str, model, input_ids):
    from transformers import DynamicCache

    from zipkv.vlm import make_vlm_cache

    text_config = model.config.get_text_config(decoder=True)
    if method == "dynamic":
        text_config._attn_implementation = "sdpa"
        return DynamicCache(config=model.config)
    return make_vlm_cache(method, model.config, input_ids)


def cache_bytes(cache) -> int:
    if hasattr(cache, "stats"):
        return cache.stats().bytes_held
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class _Device:
    """CUDA timing and memory readings; on the CPU (a smoke test of this script) memory reads 0."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start_peak(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def release(self):
        if self.cuda:
            torch.cuda.empty_cache()


def run_case(model, method, n_text, n_visual, reps, device):
    lm = model.model.language_model
    ids = torch.randint(10, 900, (1, 2 * n_text + n_visual), device=device)
    ids[:, n_text: n_text + n_visual] = IMAGE_ID
    embeds = torch.randn(1, ids.shape[1], lm.config.hidden_size, device=device, dtype=model.dtype) * 0.02
    prefill, decode, peak, held = [], [], [], None
    gpu = _Device(device)
    for rep in range(reps + 1):  # the first run warms up
        cache = make(method, model, ids)
        gpu.sync()
        before = gpu.start_peak()
        start = time.perf_counter()
        with torch.no_grad():
            lm(inputs_embeds=embeds, **zipkv.cache_kwargs(cache), use_cache=True)
        gpu.sync()
        elapsed = time.perf_counter() - start
        top = gpu.peak() - before
        start = time.perf_counter()
        with torch.no_grad():
            lm(inputs_embeds=embeds[:, -1:], **zipkv.cache_kwargs(cache), use_cache=True)
        gpu.sync()
        step = time.perf_counter() - start
        if rep:
            prefill.append(elapsed)
            decode.append(step)
            peak.append(top)
            held = cache_bytes(cache)
        del cache
        gpu.release()
    result = dict(
        method=method, text_tokens=2 * n_text, visual_tokens=n_visual,
        prefill_ms=1000 * statistics.median(prefill), decode_step_ms=1000 * statistics.median(decode),
        peak_mib=max(peak) / 2**20, cache_mib=held / 2**20,
    )
    return result


def device_info():
    info = {"python": platform.python_version(), "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.vlm_prefill", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text", type=int, default=32, help="text tokens before and after the visual span")
    parser.add_argument("--visual", default="576,2304,9216,16384")
    parser.add_argument("--methods", default="dynamic,full,zipcache,zipvl,vidkv")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tag", default="vlm_prefill")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (fp32, no memory figures)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for a smoke test")
    for name in ("layers", "text", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    visual = [int(v) for v in args.visual.split(",")]
    report = dict(command="python3 -m benchmarks.vlm_prefill " + " ".join(sys.argv[1:] if argv is None else argv),
                  device=device_info(), started=time.strftime("%Y-%m-%d %H:%M:%S"), results=[])
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model = build(args.shape, args.layers, args.device, dtype)
    for n_visual in visual:
        for method in args.methods.split(","):
            try:
                row = run_case(model, method, args.text, n_visual, args.reps, args.device)
            except torch.cuda.OutOfMemoryError as error:
                row = dict(method=method, visual_tokens=n_visual, error=f"out of memory: {error}"[:200])
                torch.cuda.empty_cache()
            row.update(shape=args.shape, layers=args.layers)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}_{args.shape}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
