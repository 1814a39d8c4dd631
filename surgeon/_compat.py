"""Import paths of modules that moved when the library was grouped into packages.

``surgeon.prior`` is now ``surgeon.drift.prior``, ``surgeon.tiny`` is ``surgeon.demo.tiny`` and so on:
the old names import the same module objects (not copies), so code and model cards written against
them keep working. Packages that took an old module's name (``surgeon.drift``, ``surgeon.data`` …)
forward unknown attributes to that module instead (``forward``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

MOVED = {
    "surgeon.safetensors_io": "surgeon.io.safetensors",
    "surgeon.checkpoint": "surgeon.io.checkpoint",
    "surgeon.streaming": "surgeon.io.streaming",
    "surgeon.output": "surgeon.io.output",
    "surgeon.provenance": "surgeon.io.provenance",
    "surgeon.layout": "surgeon.anatomy.layout",
    "surgeon.families": "surgeon.anatomy.families",
    "surgeon.align": "surgeon.anatomy.align",
    "surgeon.experts": "surgeon.anatomy.experts",
    "surgeon.inspect": "surgeon.anatomy.inspect",
    "surgeon.prior": "surgeon.drift.prior",
    "surgeon.distance": "surgeon.drift.distance",
    "surgeon.modeling_surgeon": "surgeon.modules.modeling_surgeon",
    "surgeon.iada": "surgeon.modules.iada",
    "surgeon.image_lora": "surgeon.modules.image_lora",
    "surgeon.selection": "surgeon.heads.budget",
    "surgeon.probes": "surgeon.heads.probes",
    "surgeon.reweight": "surgeon.perception.reweight",
    "surgeon.reward": "surgeon.perception.reward",
    "surgeon.diagnose": "surgeon.perception.diagnose",
    "surgeon.encoding": "surgeon.data.encoding",
    "surgeon.rows": "surgeon.data.rows",
    "surgeon.upload": "surgeon.hub.upload",
    "surgeon.card": "surgeon.hub.card",
    "surgeon.markdown": "surgeon.hub.markdown",
    "surgeon.integrations": "surgeon.training.integrations",
    "surgeon.tiny": "surgeon.demo.tiny",
    "surgeon.synthetic": "surgeon.demo.synthetic",
    "surgeon.hub_standin": "surgeon.demo.hub_standin",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module at its new place."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in MOVED:
            return None
        target = importlib.util.find_spec(MOVED[name])
        return importlib.util.spec_from_loader(name, self, origin=target.origin if target else None)

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: Any) -> None:
        pass

    def get_code(self, name: str) -> Any:
        """The moved module's code, so that ``python -m surgeon.hub_standin`` runs it as before."""
        spec = importlib.util.find_spec(MOVED[name])
        return spec.loader.get_code(spec.name)  # type: ignore[union-attr]


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def forward(package: str, *modules: str) -> Callable[[str], Any]:
    """A package ``__getattr__`` that looks names up in ``modules`` (where the package's former
    module's names now live), in order; a name without a dot is a submodule of ``package``."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule not imported yet
            return importlib.import_module(f"{package}.{name}")
        for module in modules:
            target = importlib.import_module(module if "." in module else f"{package}.{module}")
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
