"""zipkv.cli: options, errors, `generate` on a tiny local model, the subcommand hooks."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch

import zipkv
from tiny_models import tiny_model
from zipkv import cli

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "what is the pass key",
    "the sky is blue and the sun is yellow",
]
PROMPT = "the cat sat on the mat and the dog ran in the park"
GENERATE_OPTIONS = [
    "--method", "--high-bits", "--low-bits", "--bits", "--salient-ratio", "--residual-length",
    "--start-layer", "--retain-ratio", "--seed", "--ratio", "--budget", "--max-new-tokens", "--model", "--dtype",
    "--device", "--chat",
    "--no-chat", "--static", "--json",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama and a word-level tokenizer, saved like any local checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    model = tiny_model(
        "llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        # head_dim 32: the KIVI preset quantizes values in groups of 32 channels
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_cli(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


# ---- help and option errors ------------------------------------------------------------------

def test_generate_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in GENERATE_OPTIONS:
        assert re.search(rf"^\s+(--[\w-]+, )*{option}\b.*\S", text, re.MULTILINE), f"{option} not documented"
    for method in zipkv.METHODS:  # every registry method is a --method choice
        assert method in text
    # every option the parser knows is in the help, not only the ones listed above
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        for option in action.option_strings:
            assert option in text


def test_top_level_help_lists_generate(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert re.search(r"^\s+generate\s+\S", capsys.readouterr().out, re.MULTILINE)


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["generate"], "required: prompt"),
    (["generate", ""], "prompt: must not be empty"),
    (["generate", "   \n"], "prompt: must not be empty"),
    (["generate", "hi", "--method", "foo"], "argument --method: method must be one of ['full', 'zipcache'"),
    (["generate", "hi", "--method", "kivi:bits"], "argument --method: method parameter must be key=value"),
    (["generate", "hi", "--method", "h2o"], "argument --method: give exactly one of budget"),
    (["generate", "hi", "--method", "snapkv:ratio=2"],
     "argument --method: ratio=2 is outside the allowed range (0, 1]"),
    (["generate", "hi", "--method", "snapkv", "--ratio", "1.5"],
     "argument --ratio: ratio=1.5 is outside the allowed range (0, 1]"),
    (["generate", "hi", "--method", "snapkv", "--ratio", "0"], "argument --ratio: ratio=0 is outside"),
    (["generate", "hi", "--method", "h2o", "--budget", "0"],
     "argument --budget: budget=0 is outside the allowed range [1, inf]"),
    (["generate", "hi", "--method", "h2o", "--budget", "-1"], "argument --budget: budget=-1 is outside"),
    (["generate", "hi", "--method", "h2o", "--budget", "lots"], "argument --budget: must be a number"),
    (["generate", "hi", "--method", "kivi:bits=3"], "argument --method: bits must be one of (2, 4, 8) (got 3)"),
    (["generate", "hi", "--method", "zipkv:foo=1"], "argument --method: zipkv does not take ['foo']; it accepts"),
    (["generate", "hi", "--method", "snapkv:ratio=0.2", "--ratio", "0.3"], "--ratio given twice"),
    (["generate", "hi", "--ratio", "0.5"], "--ratio does not apply to --method zipkv"),
    (["generate", "hi", "--method", "zipcache", "--high-bits", "2", "--low-bits", "4"],
     "argument --low-bits: low_bits (4) must not exceed high_bits (2)"),
    (["generate", "hi", "--method", "minicache", "--static"], "--static needs a method with a static form"),
    (["generate", "hi", "--high-bits", "3"], "invalid choice: 3"),
    (["generate", "hi", "--salient-ratio", "1.5"], "--salient-ratio: must be a number in [0, 1]"),
    (["generate", "hi", "--salient-ratio", "most"], "--salient-ratio: must be a number in [0, 1]"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
    (["generate", "hi", "--residual-length", "-1"], "--residual-length: must be an integer >= 0"),
    (["generate", "hi", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["generate", "hi", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["generate", "hi", "--bits", "4"], "--bits does not apply to --method zipkv"),
    (["generate", "hi", "--retain-ratio", "1.5"], "--retain-ratio: must be a number in [0, 1]"),
    (["generate", "hi", "--start-layer", "2"], "--start-layer does not apply to --method zipkv"),
    (["generate", "hi", "--method", "full", "--high-bits", "4"], "--high-bits does not apply to --method full"),
    (["generate", "hi", "--method", "kivi", "--salient-ratio", "0.5"], "--salient-ratio does not apply to --method kivi"),
    (["generate", "hi", "--model", "no/such/model"], "does not exist"),
    (["generate", "hi", "--model", "/nonexistent"], "error: --model must be 'default', a local model"),
    (["generate", "hi", "--salient-ratio", "0.5"], "--salient-ratio does not apply to --method zipkv"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    assert message in usage_error(argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--method", "uniform", "--low-bits", "2"], "does not apply"),
    (["--method", "snapkv:ratio=2"], "outside the allowed range"),
    (["--method", "zipkv:foo=1"], "does not take"),
    (["--method", "minicache", "--retain-ratio", "0.5", "--start-layer", "0", "--budget", "4"], "does not apply"),
])
def test_bad_options_fail_before_any_model_loads(capsys, monkeypatch, argv, message):
    from zipkv import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert message in usage_error(["generate", "hi", *argv], capsys)


def test_chat_without_a_chat_template_is_an_error(tiny_model_dir, capsys):
    err = usage_error(["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "full", "--chat"], capsys)
    assert "no chat template" in err


def test_inconsistent_cache_options_are_reported_from_make_cache(tiny_model_dir, capsys):
    err = usage_error(
        ["generate", PROMPT, "--model", str(tiny_model_dir), "--high-bits", "2", "--low-bits", "4"], capsys
    )
    assert "low_bits (4) must not exceed high_bits (2)" in err


# ---- generate with a fake cache: what the CLI passes and prints ----------------------------

class RecordingCache:
    """Stands in for make_cache: a DynamicCache that reports made-up stats."""

    calls = []

    def __new__(cls, method, config, **params):
        from transformers import DynamicCache

        cls.calls.append((method, params))
        cache = DynamicCache(config=config)
        cache.stats = lambda: zipkv.CacheStats(
            tokens_per_layer=[7, 7], bytes_per_layer=[1000, 1048], fp16_bytes_per_layer=[4096, 4096]
        )
        return cache


def test_generate_passes_only_given_cache_options(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(zipkv, "make_cache", RecordingCache)
    RecordingCache.calls.clear()
    argv = ["generate", PROMPT, "--model", str(tiny_model_dir), "--max-new-tokens", "3"]
    run_cli(argv + ["--method", "kivi", "--bits", "4", "--residual-length", "16"], capsys)
    run_cli(argv + ["--method", "zipcache", "--salient-ratio", "0.25", "--seed", "3"], capsys)
    run_cli(argv + ["--method", "full"], capsys)
    assert RecordingCache.calls == [
        ("kivi", {"bits": 4, "residual_length": 16}),
        ("zipcache", {"salient_ratio": 0.25, "seed": 3}),
        ("full", {}),
    ]
    RecordingCache.calls.clear()
    run_cli(argv + ["--method", "snapkv:window=8,kernel_size=3", "--ratio", "0.5"], capsys)
    run_cli(argv + ["--method", "zipvl:tau=0.9,sparse_prefill=true"], capsys)
    assert RecordingCache.calls == [
        ("snapkv", {"window": 8, "kernel_size": 3, "ratio": 0.5}),
        ("zipvl", {"tau": 0.9, "sparse_prefill": True}),
    ]


def test_generate_prints_answer_then_memory_table(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(zipkv, "make_cache", RecordingCache)
    status, out, _ = run_cli(
        ["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "uniform", "--max-new-tokens", "3"], capsys
    )
    assert status == 0
    lines = out.splitlines()
    assert "KV cache: uniform" in out and lines.index(next(l for l in lines if "KV cache:" in l)) >= 1
    assert re.search(r"tokens held per layer\s*│\s*7\s*│", out)
    assert re.search(r"bytes held\s*│\s*2\.00 KiB \(2,048 B\)", out)
    assert re.search(r"fp16 DynamicCache would hold\s*│\s*8\.00 KiB \(8,192 B\)", out)
    assert re.search(r"ratio \(fp16 / held\)\s*│\s*4\.00x", out)


# ---- generate for real, through zipkv.make_cache ---------------------------------------------

def greedy_reference(model_dir, prompt, new_tokens):
    """Plain transformers greedy decoding with its own DynamicCache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_generate_full_matches_plain_greedy_decoding(tiny_model_dir, capsys):
    status, out, _ = run_cli(
        ["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "full", "--max-new-tokens", "6",
         "--device", "cpu", "--json"], capsys,
    )
    assert status == 0
    report = json.loads(out)
    assert report["answer"] == greedy_reference(tiny_model_dir, PROMPT, 6)
    assert report["chat"] is False and report["method"] == "full" and report["params"] == {}
    held = report["prompt_tokens"] + report["new_tokens"] - 1  # the last token is never fed back
    assert report["memory"]["tokens_per_layer"] == [held, held]
    assert report["memory"]["fp16_bytes"] == 2 * 2 * held * 1 * 32 * 2  # layers*(k,v)*tokens*heads*dim*2 B


@pytest.mark.parametrize("method, extra", [
    ("zipcache", ["--high-bits", "4", "--low-bits", "2", "--salient-ratio", "0.5"]),
    ("kivi", ["--bits", "2", "--residual-length", "4"]),
    ("uniform", ["--bits", "4"]),
    ("minicache", ["--start-layer", "0", "--retain-ratio", "0.1"]),
])
def test_generate_compressed_methods_hold_fewer_bytes(tiny_model_dir, capsys, method, extra):
    status, out, _ = run_cli(
        ["generate", PROMPT, "--model", str(tiny_model_dir), "--method", method, "--max-new-tokens", "4",
         "--dtype", "float16", "--json", *extra], capsys,
    )
    assert status == 0
    memory = json.loads(out)["memory"]
    assert memory["bytes_held"] == sum(memory["bytes_per_layer"]) > 0
    assert memory["ratio"] == pytest.approx(memory["fp16_bytes"] / memory["bytes_held"])
    assert memory["ratio"] > 1.0, memory


@pytest.mark.parametrize("method, extra", [
    ("streaming_llm", ["--budget", "8"]),
    ("snapkv:window=4,kernel_size=3", ["--ratio", "0.5"]),
    ("zipvl", []),
])
def test_generate_any_registry_method(tiny_model_dir, capsys, method, extra):
    """Eviction and tiered methods run through `generate` like the quantizing ones."""
    status, out, _ = run_cli(
        ["generate", PROMPT, "--model", str(tiny_model_dir), "--method", method, "--max-new-tokens", "4",
         "--json", *extra], capsys,
    )
    assert status == 0
    report = json.loads(out)
    assert report["method"] == method.split(":")[0]
    memory = report["memory"]
    assert memory["bytes_held"] == sum(memory["bytes_per_layer"]) > 0
    if method == "streaming_llm":
        assert memory["tokens_per_layer"] == [8, 8]  # the budget holds at every step
    else:
        assert memory["bytes_held"] < memory["fp16_bytes"], memory


@pytest.mark.parametrize("method", ["kivi", "zipcache"])
def test_generate_static_gives_the_same_answer(tiny_model_dir, capsys, method):
    """--static (preallocated buffers; CUDA graphs on a GPU) decodes the same tokens."""
    argv = ["generate", PROMPT, "--model", str(tiny_model_dir), "--method", method, "--max-new-tokens", "6",
            "--device", "cpu", "--json"]
    eager = json.loads(run_cli(argv, capsys)[1])
    status, out, _ = run_cli(argv + ["--static"], capsys)
    assert status == 0
    static = json.loads(out)
    assert static["static"] and static["answer"] == eager["answer"]
    assert static["memory"]["tokens_per_layer"] == eager["memory"]["tokens_per_layer"]


def test_generate_static_prefill_chunk_and_compile(tiny_model_dir, capsys):
    """--prefill-chunk N (chunked_prefill) with --static: the full cache's answer unchanged;
    --compile and --prefill-chunk need --static; an eviction method's refusal names the option
    (the compiled step itself: tests/test_compiled_decode.py)."""
    base = ["generate", PROMPT, "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--device", "cpu", "--json"]
    one = json.loads(run_cli(base + ["--method", "full", "--static"], capsys)[1])
    status, out, _ = run_cli(base + ["--method", "full", "--static", "--prefill-chunk", "3"], capsys)
    assert status == 0
    chunked = json.loads(out)
    assert chunked["prefill_chunk"] == 3 and chunked["answer"] == one["answer"]
    for flag in (["--compile"], ["--prefill-chunk", "4"]):
        err = usage_error(base + ["--method", "zipkv", *flag], capsys)
        assert f"{flag[0]} needs --static" in err
    err = usage_error(base + ["--method", "snapkv:ratio=0.5", "--static", "--prefill-chunk", "2"], capsys)
    assert "--prefill-chunk 2" in err and "sizes its budget" in err
    err = usage_error(base + ["--method", "zipkv", "--static", "--prefill-chunk", "0"], capsys)
    assert "--prefill-chunk" in err


def test_generate_static_needs_a_quantizing_method(tiny_model_dir, capsys):
    err = usage_error(["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "minicache", "--static",
                       "--device", "cpu"], capsys)
    assert "--static needs a method with a static form" in err


def test_generate_table_for_real_cache(tiny_model_dir, capsys):
    status, out, _ = run_cli(
        ["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "zipcache", "--max-new-tokens", "3"], capsys
    )
    assert status == 0
    for label in ("tokens held per layer", "bytes held", "fp16 DynamicCache would hold", "ratio"):
        assert label in out


# ---- hooks for subcommands from other rooms --------------------------------------------------

def test_subcommand_modules_are_picked_up_and_missing_ones_skipped(monkeypatch, capsys):
    plugin = types.ModuleType("zipkv_test_plugin")

    def add_parser(subparsers):
        parser = subparsers.add_parser("fake", help="a test subcommand")
        parser.add_argument("--times", type=int, default=1)
        return parser

    plugin.add_parser = add_parser
    plugin.run = lambda args: args.times + 40
    monkeypatch.setitem(sys.modules, "zipkv_test_plugin", plugin)
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("zipkv_test_plugin", "zipkv.no_such_room.cli"))
    assert cli.main(["fake", "--times", "2"]) == 42
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert re.search(r"^\s+fake\s+a test subcommand", capsys.readouterr().out, re.MULTILINE)


def test_subcommand_module_with_a_broken_import_is_reported_not_fatal(monkeypatch, tmp_path, capsys):
    (tmp_path / "zipkv_test_broken.py").write_text("import zipkv_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("zipkv_test_broken",))
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--help"])
    assert exited.value.code == 0
    err = capsys.readouterr().err
    assert "zipkv_test_broken are unavailable" in err and "zipkv_dependency_that_is_missing" in err


def test_default_method_is_the_best_measured_recipe(capsys):
    # README "Results" (results/passkey_ablation.json): zipkv's recipe is the best measured one.
    assert cli.DEFAULT_METHOD == "zipkv"
    assert cli.build_parser().parse_args(["generate", "hi"]).method == ("zipkv", {})
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "(default: zipkv)" in " ".join(capsys.readouterr().out.split())


def test_model_folder_without_a_model_names_the_flag(tmp_path, capsys):
    message = usage_error(["generate", "hi", "--model", str(tmp_path), "--max-new-tokens", "1"], capsys)
    assert "--model: no model in this folder" in message
    assert "tokenizer" not in message.split("no model in this folder")[0]


def test_config_defaults_copy_matches_compression_config():
    # cli keeps a copy so that `zipkv --help` need not import torch: it must not drift.
    from zipkv.cache.config import CompressionConfig

    for name, value in cli.CONFIG_DEFAULTS.items():
        assert getattr(CompressionConfig(), name) == value


def test_residual_length_help_lists_each_preset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    # every method whose default window is not 0 is named with its default, in registry order
    windows = [f"{name} {spec.defaults['residual_length']}" for name, spec in zipkv.METHODS.items()
               if spec.defaults.get("residual_length")]
    assert "kivi 128" in windows
    assert f"newest tokens always kept in fp16 (preset 0; {', '.join(windows)})" in help_text


def _report(method, params=None, dtype="float32", tokens=49):
    return {"method": method, "params": params or {}, "dtype": dtype, "memory": {"tokens_per_layer": [tokens] * 3}}


def test_ratio_notes_say_why_the_ratio_is_low():
    (full,) = cli.ratio_notes(_report("full"))
    assert "float32" in full and "0.50x" in full
    assert cli.ratio_notes(_report("full", dtype="bfloat16")) == []
    (kivi,) = cli.ratio_notes(_report("kivi"))
    assert "newest 128 tokens (residual_length)" in kivi and "block of 32" in kivi
    (zipkv_note,) = cli.ratio_notes(_report("zipkv"))
    assert "block of 100" in zipkv_note and "residual_length" not in zipkv_note
    assert "block of 8" in cli.ratio_notes(_report("zipkv", {"stream_interval": 8}, tokens=20))[0]
    # long contexts: the fp16 part is small, no note; eviction ratios need none
    assert cli.ratio_notes(_report("zipkv", tokens=4096)) == []
    assert cli.ratio_notes(_report("snapkv", {"ratio": 0.5})) == []


def test_generate_table_explains_the_ratio(tiny_model_dir, capsys):
    status, out, _ = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "full",
                              "--max-new-tokens", "2"], capsys)
    assert status == 0 and "why this ratio" in out and "float32" in out
    status, out, _ = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--method", "kivi",
                              "--max-new-tokens", "2", "--json"], capsys)
    report = json.loads(out)
    assert report["ratio_notes"] == cli.ratio_notes(report) and "residual_length" in report["ratio_notes"][0]
