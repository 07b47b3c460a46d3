"""Which transformers releases zipkv runs on, and how the cache is passed to a model.

zipkv replaces transformers' cache layers and attention function, whose interfaces change
between minor releases; a release outside the tested range fails at import with the installed
and supported versions named, instead of computing wrong answers later. The range is the
`transformers` pin of pyproject.toml (a test keeps both equal).

Set ZIPKV_ALLOW_UNTESTED_TRANSFORMERS=1 to import zipkv anyway (a warning instead of the
error), e.g. to try a new transformers release before zipkv has been tested on it.
"""

from __future__ import annotations

import functools
import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_TRANSFORMERS = ">=5.2,<5.25"
ALLOW_UNTESTED_ENV = "ZIPKV_ALLOW_UNTESTED_TRANSFORMERS"

# transformers 5.24 renamed the cache argument of generate() and of every model's forward
# from `past_key_values=` to `cache=` (the old name warns, removal announced for 5.40);
# older releases know only `past_key_values=`.
CACHE_RENAMED_IN = Version("5.24")


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str | None = None) -> None:
    """Raise ImportError when `version` (default: the installed transformers) is outside
    SUPPORTED_TRANSFORMERS; with ZIPKV_ALLOW_UNTESTED_TRANSFORMERS=1, warn instead."""
    version = installed_transformers() if version is None else version
    # prereleases=True: a 5.24 release candidate counts as 5.24; a 5.25.0.dev0 still falls
    # outside "<5.25" (PEP 440 keeps the pre-releases of an excluded bound out).
    if SpecifierSet(SUPPORTED_TRANSFORMERS).contains(version, prereleases=True):
        return
    message = f"zipkv supports transformers {SUPPORTED_TRANSFORMERS} but transformers {version} is installed"
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(f"{message}: running untested ({ALLOW_UNTESTED_ENV}=1)", RuntimeWarning, stacklevel=2)
        return
    raise ImportError(
        f"{message}; install a supported release (pip install 'transformers{SUPPORTED_TRANSFORMERS}'), "
        f"or set {ALLOW_UNTESTED_ENV}=1 to try this one untested"
    )


@functools.cache
def check_installed_transformers() -> None:
    """check_transformers_version() of the installed release, once per process (zipkv.cache
    and zipkv.attention both call it at import: one warning, not two, when allowed)."""
    check_transformers_version()


def cache_argument_name(version: str | None = None) -> str:
    """The keyword generate() and a model's forward take the cache under: "cache" from
    transformers 5.24 on, "past_key_values" before."""
    version = installed_transformers() if version is None else version
    return "cache" if Version(version).release >= CACHE_RENAMED_IN.release else "past_key_values"


def cache_kwargs(cache) -> dict:
    """{name: cache} for the installed transformers, so that zipkv's own calls
    (`model.generate(**inputs, **cache_kwargs(cache))`) raise no deprecation warning."""
    return {cache_argument_name(): cache}


__all__ = [
    "ALLOW_UNTESTED_ENV",
    "SUPPORTED_TRANSFORMERS",
    "cache_argument_name",
    "cache_kwargs",
    "check_installed_transformers",
    "check_transformers_version",
    "installed_transformers",
]
