"""Method specs as written on the command line: NAME[:key=value,key=value].

Examples: `full`, `zipcache:high_bits=4,low_bits=2,salient_ratio=0.6`, `kivi:bits=2`,
`hf-quanto:nbits=4`, `kvpress-snapkv:compression_ratio=0.5`. The syntax and the value
coercion (true/false, none, int, float, text) are zipkv.registry.parse_method_spec's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...registry import parse_method_spec


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        return cls(*parse_method_spec(text))

    @property
    def label(self) -> str:
        """Canonical text: parameters sorted, so equal specs give equal labels (resume keys)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={self.params[k]}" for k in sorted(self.params))

    def __hash__(self) -> int:
        return hash(self.label)
