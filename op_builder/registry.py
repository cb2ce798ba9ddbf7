"""The op registry: an explicit dict, not reflection over module names.

DeepSpeed turned every imported name ending in `Builder` into a registry entry (`TorchCPUOpBuilder
= None` included) and instantiated builders on import. Here a new op is one line below.
"""
from __future__ import annotations

from .builder import OpBuilder
from .inference import InferenceBuilder

BUILDERS: dict[str, type[OpBuilder]] = {
    InferenceBuilder.NAME: InferenceBuilder,
}

#: name -> builder instance (DeepSpeed's ALL_OPS). Instances are cheap: they probe nothing until used.
ALL_OPS: dict[str, OpBuilder] = {name: cls() for name, cls in BUILDERS.items()}


def get_builder(name: str) -> OpBuilder:
    """The builder registered as `name` (e.g. "transformer_inference")."""
    try:
        return ALL_OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(ALL_OPS))}") from None
