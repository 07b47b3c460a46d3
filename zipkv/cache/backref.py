"""`BackReference`: an attribute that points back at a parent object without owning it.

A layer names the cache that holds it (`layer.owner`: zipkv attention tells one cache's
notes from another's, an evicting layer reports its bytes to the cache). A plain attribute
would make cache -> layers -> layer -> cache a reference cycle, and a cycle outlives the
cache's last reference until Python's cyclic collector happens to run: gigabytes of KV
cache held between requests on a GPU. Held weakly, the cache is freed the moment its
last reference goes; reading the attribute afterwards gives None.
"""

from __future__ import annotations

import weakref


class BackReference:
    """Data descriptor: `obj.name = parent` keeps a weak reference, `obj.name` reads it (None
    when unset or when the parent is gone). Stored in the instance dict as `_<name>_ref`, so a
    copy of the instance dict (`vars(a)` into `vars(b)`) carries the same back reference."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_{name}_ref"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        ref = obj.__dict__.get(self.slot)
        return None if ref is None else ref()

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = None if value is None else weakref.ref(value)


__all__ = ["BackReference"]
