"""The op registry: "module:Class" strings, imported on first use - not reflection over module names.

DeepSpeed turned every imported name ending in `Builder` into a registry entry (`TorchCPUOpBuilder
= None` included) and instantiated builders on import. Here a builder is one line below, named by
where it lives (a builder belongs with its ops: the inference builder is `dsinf.builder`), and nothing
is imported until an entry is used: op_builder itself imports nothing from the packages it builds for.
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping

from .builder import OpBuilder

#: name -> "module:Class" of its builder.
BUILDERS: dict[str, str] = {
    "transformer_inference": "dsinf.builder:InferenceBuilder",
}


def builder_class(name: str) -> type[OpBuilder]:
    """The builder class registered as `name` (imports its module)."""
    try:
        target = BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(BUILDERS))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


class _LazyOps(Mapping):
    """name -> builder instance (DeepSpeed's ALL_OPS), each made on first access. Instances are cheap:
    they probe nothing until used."""

    def __init__(self):
        self._instances: dict[str, OpBuilder] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> OpBuilder:
        if name not in self._instances:
            cls = builder_class(name)
            with self._lock:
                self._instances.setdefault(name, cls())
        return self._instances[name]

    def __iter__(self) -> Iterator[str]:
        return iter(BUILDERS)

    def __len__(self) -> int:
        return len(BUILDERS)


ALL_OPS: Mapping[str, OpBuilder] = _LazyOps()


def get_builder(name: str) -> OpBuilder:
    """The builder registered as `name` (e.g. "transformer_inference")."""
    return ALL_OPS[name]
