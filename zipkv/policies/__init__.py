"""Eviction policies, one file per kind: which tokens go to which tier at prefill and while
decoding, under which budget.

| file | policy | methods |
|---|---|---|
| `base.py` | `Policy` (budgets, weak binding to layers, hook dispatch), `PolicyLayer` (what a policy may read and call on a layer) | - |
| `keep.py` | `KeepPolicy` | full (and the prefill recording) |
| `select.py` | `SelectPolicy`, `BUDGET_RULES` (rule name -> budget function of `zipkv/eviction/budgets/`), `build_select` | snapkv, pyramidkv, adakv, defensive_kv, key_norm |
| `cake.py` | `CakePolicy` (a SelectPolicy with a cascade over layers), `build_cake` | cake |
| `continuous.py` | `ContinuousPolicy`, `build_continuous` | streaming_llm, h2o |
| `tiered.py` | `TieredPolicy`, `build_zipvl`, `build_mikv`, `build_three_tier` (`zipvl_probes.py`: ZipVL's probes and important set) | zipvl, zipvl_v2, three_tier, mikv |

A registry method names its builder as "<file>.<function>" (zipkv/registry.py `_evicting`):
a new policy is one file here with its `build_*` and one registry line.
"""

from .base import Policy, PolicyLayer
from .cake import CakePolicy
from .continuous import ContinuousPolicy
from .keep import KeepPolicy
from .select import BUDGET_RULES, SelectPolicy
from .tiered import TieredPolicy
from .zipvl_probes import ZipVLSelection

__all__ = ["BUDGET_RULES", "CakePolicy", "ContinuousPolicy", "KeepPolicy", "Policy", "PolicyLayer", "SelectPolicy",
           "TieredPolicy", "ZipVLSelection"]
