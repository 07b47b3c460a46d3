"""Cross-layer merging (MiniCache): pure tensor functions, no model and no cache state.

`slerp` holds the geometry (unit directions, angular distance, SLERP); `pair` merges two
adjacent layers' states into one shared direction plus per-layer norms and a retained set,
and restores each layer's approximate states from them.
"""

from .pair import MergedStates, merge_states, restore_states, retained_count
from .slerp import angular_distance, slerp, unit_directions

__all__ = [
    "MergedStates", "merge_states", "restore_states", "retained_count",
    "angular_distance", "slerp", "unit_directions",
]
