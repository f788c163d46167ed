"""The pass registry: stable names -> pass classes, and the default pipeline.

A pass is a class with `name`, `summary` and `run(graph, ctx) -> PassResult`, registered with
`@register_pass`. mmc's own passes register when `mmc.passes` is imported; third-party passes
come from a module named with `--pass-module` (a dotted module or a .py file) or from an
installed package that declares an entry point in the `mmc.passes` group.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

import onnx_graphsurgeon as gs

from .errors import MmcError


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)  # rewrites per rule


class Pass(Protocol):
    name: str
    summary: str

    def run(self, graph: gs.Graph, ctx) -> PassResult: ...


_REGISTRY: dict[str, type] = {}

# The order `--passes all` runs (mmc.passes fills it in as its modules register).
DEFAULT_PIPELINE: list[str] = []


def register_pass(cls=None, *, default: bool = False):
    """Class decorator: register a pass under `cls.name`; `default=True` appends it to `all`."""

    def wrap(c):
        for attr in ("name", "summary", "run"):
            if not hasattr(c, attr):
                raise TypeError(f"pass {c.__name__} lacks {attr!r}")
        if c.name in _REGISTRY and _REGISTRY[c.name] is not c:
            raise MmcError(f"pass name {c.name!r} is registered twice ({_REGISTRY[c.name].__module__}, {c.__module__})")
        _REGISTRY[c.name] = c
        if default and c.name not in DEFAULT_PIPELINE:
            DEFAULT_PIPELINE.append(c.name)
        return c

    return wrap(cls) if cls is not None else wrap


def load_builtin_passes() -> None:
    importlib.import_module("mmc.passes")
    for ep in entry_points(group="mmc.passes"):
        try:
            ep.load()
        except Exception as e:  # a broken plugin package must not break mmc
            raise MmcError(f"pass plugin {ep.name!r} ({ep.value}) failed to load: {e}") from e


def load_pass_module(spec: str) -> None:
    """Import a user module that registers passes: a dotted module name or a path to a .py file."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise MmcError(f"pass module {spec} does not exist")
        mod_name = f"mmc_user_passes_{path.stem}"
        if mod_name in sys.modules and Path(sys.modules[mod_name].__file__).resolve() == path.resolve():
            return  # already loaded
        s = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = module
        try:
            s.loader.exec_module(module)
        except Exception as e:
            raise MmcError(f"pass module {spec} failed to import: {type(e).__name__}: {e}") from e
        return
    try:
        importlib.import_module(spec)
    except ImportError as e:
        raise MmcError(f"pass module {spec!r} cannot be imported: {e}") from e


def registered() -> dict[str, type]:
    load_builtin_passes()
    return dict(_REGISTRY)


def resolve_pipeline(spec: str | list[str] | None) -> list[str]:
    """`all`, `none`, or a comma list of names (where `all` expands in place)."""
    load_builtin_passes()
    if spec is None:
        spec = "all"
    items = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",") if s.strip()]
    names: list[str] = []
    for item in items:
        if item == "none":
            continue
        if item == "all":
            names += DEFAULT_PIPELINE
        elif item in _REGISTRY:
            names.append(item)
        else:
            known = ", ".join(sorted(_REGISTRY))
            raise MmcError(f"unknown pass {item!r} (known: {known}; see `mmc passes`)")
    return names


def create(name: str):
    return _REGISTRY[name]()
