"""The compressed cache: settings, packed storage, per-layer policy, accounting."""

from ..transformers_support import check_installed_transformers

# Before any module that subclasses transformers' cache classes: a release outside the tested
# range fails here, naming the installed and the supported versions.
check_installed_transformers()

from .baseline_cache import TokenQuantCache
from .cache import ZipCache
from .config import CompressionConfig
from .layer import ZipCacheLayer
from .stats import CacheStats

__all__ = ["TokenQuantCache", "ZipCache", "CompressionConfig", "ZipCacheLayer", "CacheStats"]
