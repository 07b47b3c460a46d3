"""lm-evaluation-harness (0.4.x) with a compressed KV cache: the model type `zipkv`.

    pip install "zipkv[lm_eval]"
    python -m zipkv.integrations.lm_eval --model zipkv \\
        --model_args pretrained=default,method=snapkv,ratio=0.2 --tasks TASK --device cpu
    zipkv lm-eval ...                     # the same, from the installed command

lm-eval 0.4 finds model types only in its own registry (`register_model`) and loads no plugins
through entry points, so a bare `lm_eval --model zipkv` cannot see zipkv: these two commands
register the model type `zipkv` and then run lm-eval's own command line with the arguments
unchanged (every lm-eval option and task works). From Python, call `register()` before
`lm_eval.simple_evaluate(model="zipkv", ...)`, or pass an instance of `ZipkvLM`.

model_args (comma-separated key=value, as lm-eval parses them):
  pretrained   "default" (the embedded SmolLM2-135M, also when left out), a name of
               zipkv.model_zoo, a local transformers folder or a .gguf file (zipkv.load_model;
               nothing is fetched from the Hugging Face hub)
  gguf_file    a .gguf file name inside the `pretrained` folder
  method       a zipkv method (`zipkv methods`), optionally with one parameter in the spec
               syntax (`kivi:bits=4`); default "zipkv"
  any other key that is not one of lm-eval's HFLM settings below goes to the method
               (`method=snapkv,ratio=0.2,window=16`); names and values are checked before the
               model loads, errors name the key and what is allowed
  dtype        float32, float16, bfloat16 or auto (float32 on a CPU, bfloat16 on CUDA)
  device       cpu, cuda, cuda:N (default: cuda when available, else cpu)
  stepwise     false (default): a continuation is scored by one forward on top of the
               compressed context; true: one forward per token, as decoding would feed it
  lm-eval's own: batch_size, max_batch_size, max_length, truncation, softmax_dtype,
               mixed_precision_dtype, add_bos_token, prefix_token_id, think_end_token,
               enable_thinking, chat_template_args, logits_cache (unused: no batching here)

How the cache is used: see lm_eval_model.ZipkvLM. This module imports neither lm_eval nor
torch at the top, so `import zipkv.integrations.lm_eval` works without lm-eval installed.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from ..registry import MethodError, check_method, parse_method_spec

MODEL_NAME = "zipkv"
MODEL_TARGET = "zipkv.integrations.lm_eval_model:ZipkvLM"
DEFAULT_METHOD = "zipkv"
INSTALL_HINT = "pip install 'zipkv[lm_eval]' (lm-eval 0.4.x)"

# The adapter's own model_args.
OWN_SETTINGS = ("pretrained", "gguf_file", "method", "dtype", "device", "stepwise")
# HFLM settings that still mean something for a model zipkv has loaded.
HFLM_SETTINGS = (
    "batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "softmax_dtype",
    "mixed_precision_dtype", "add_bos_token", "prefix_token_id", "think_end_token", "enable_thinking",
    "chat_template_args",
)
# HFLM settings about how HFLM itself loads a model from the hub: zipkv loads it instead.
REFUSED_SETTINGS = (
    "backend", "revision", "subfolder", "tokenizer", "trust_remote_code", "use_fast_tokenizer", "parallelize",
    "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan", "peft", "delta", "autogptq", "gptqmodel",
)


def split_model_args(model_args: Mapping[str, Any]) -> tuple[dict, dict, str, dict]:
    """(own settings, HFLM settings, method name, method params) of the model_args of
    `--model zipkv`, every value checked that can be checked without a model (a bad method
    name or parameter raises ValueError naming it before anything loads)."""
    own, hflm, params = {}, {}, {}
    for key, value in model_args.items():
        if key in REFUSED_SETTINGS:
            raise ValueError(f"model_args: {key} is an option of lm-eval's hf model loader; zipkv loads "
                             f"`pretrained` itself (a local folder, a .gguf file, 'default' or a zipkv model name)")
        (own if key in OWN_SETTINGS else hflm if key in HFLM_SETTINGS else params)[key] = value
    spec = own.pop("method", None) or DEFAULT_METHOD
    try:
        method, in_spec = parse_method_spec(str(spec))
        both = sorted(set(in_spec) & set(params))
        if both:
            raise MethodError(f"{both[0]} is given twice (in method={spec} and as its own key)", both[0])
        params = {**in_spec, **params}
        check_method(method, params)
    except MethodError as error:
        raise ValueError(f"model_args: {error}") from None
    stepwise = own.get("stepwise", False)
    if not isinstance(stepwise, bool):
        raise ValueError(f"model_args: stepwise must be true or false (got {stepwise!r})")
    return own, hflm, method, params


def register() -> None:
    """Make `zipkv` a model type of lm-eval's registry (idempotent). lm-eval's own models are
    registered first: lm-eval fills its registry only when it finds it empty."""
    try:
        import lm_eval.models  # noqa: F401  (registers hf, vllm, ... as lazy placeholders)
        from lm_eval.api.registry import model_registry
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"the lm_eval adapter needs lm-eval: {INSTALL_HINT}", name=error.name) from error
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the model type `zipkv` registered; argv as lm_eval takes it.
    With --model zipkv, the model_args are checked first (exit status 2, one line naming the
    bad key), before lm-eval indexes its tasks or anything loads."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
    except ModuleNotFoundError as error:
        print(f"zipkv lm-eval: {error}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.utils import simple_parse_args_string

    given = model_args_text(argv)
    if given is not None:
        try:
            split_model_args(simple_parse_args_string(given))
        except ValueError as error:
            print(f"zipkv lm-eval: error: {error}", file=sys.stderr)
            return 2
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # lm-eval's HarnessCLI reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def model_args_text(argv: list[str]) -> str | None:
    """The --model_args of an lm_eval command line whose --model is zipkv, joined as
    "k=v,k=v" (lm-eval takes them as one or several words); None for another model type or a
    form this does not read (JSON): lm-eval then checks them itself."""
    model, words, i = None, [], 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        i += 1
        if flag in ("--model", "-M"):
            model = inline if eq else (argv[i] if i < len(argv) else None)
            i += 0 if eq else 1
        elif flag in ("--model_args", "-a"):
            if eq:
                words.append(inline)
            while not eq and i < len(argv) and not argv[i].startswith("-"):
                words.append(argv[i])
                i += 1
    if model != MODEL_NAME or any(w.lstrip().startswith("{") for w in words):
        return None
    return ",".join(words)


# ---- `zipkv lm-eval` (zipkv/cli.py's subcommand protocol) -----------------------------------------

def add_parser(subparsers):
    # every argument goes to lm-eval unchanged, --help included (no option prefix of our own)
    parser = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="\0",
        help="run lm-evaluation-harness with a compressed cache: --model zipkv --model_args pretrained=...,method=...",
        description="lm-eval's command line with the model type zipkv registered (pip install 'zipkv[lm_eval]').",
    )
    parser.add_argument("lm_eval_args", nargs="*", help="lm_eval's own arguments")
    return parser


def run(args) -> int:
    return main(args.lm_eval_args)


def __getattr__(name):
    if name == "ZipkvLM":  # the HFLM subclass, importing lm_eval on first use
        from .lm_eval_model import ZipkvLM

        return ZipkvLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
