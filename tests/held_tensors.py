"""What the accounting tests compare stats() with: every tensor an object really holds."""

import torch

# attributes that point at what another object owns (the cache, a shared policy, aliases)
NOT_OWNED = ("owner", "policy", "recorded", "tier_stores")
# objects whose tensors a cache holds: zipkv's own, and transformers' layers a cache keeps
# (the window layers of sliding-attention models)
OWNED_MODULES = ("zipkv", "transformers.cache_utils")


def reachable_tensors(obj, seen=None):
    """Every distinct tensor reachable from obj through lists, tuples, dicts and zipkv objects,
    each object and tensor counted once (pass one `seen` set to share it across calls)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        items = [v for k, v in vars(obj).items() if k not in NOT_OWNED]
    found = []
    for value in items:
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif isinstance(value, (list, tuple, dict)) or (
            hasattr(value, "__dict__") and type(value).__module__.startswith(OWNED_MODULES)
        ):
            found += reachable_tensors(value, seen)
    return found


def held_bytes(obj, seen=None) -> int:
    return sum(t.numel() * t.element_size() for t in reachable_tensors(obj, seen))
