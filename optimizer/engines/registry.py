"""The engines servetune can launch, by name. Each adapter module registers its class:

    @register("vllm")
    class VllmEngine(CatalogEngine): ...

and the rest of servetune asks here: :func:`get_engine` for an engine to launch, :func:`engine_class` for a
trait without building one, :func:`names` for the list. Adapters are found by importing every module of
``optimizer/engines/`` once, on the first question, so a new engine is one module (and its catalog YAML in
``search_spaces/``) with no list to extend.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from servetune.optimizer.engines.base import Engine

E = TypeVar("E", bound=type[Engine])

_ENGINES: dict[str, type[Engine]] = {}
_discovered = False


def register(name: str) -> Callable[[E], E]:
    """Class decorator: the engine answers to ``name`` (in study files, trial records and export formats)."""
    def add(cls: E) -> E:
        if name in _ENGINES and _ENGINES[name] is not cls:
            raise ValueError(f"engine {name!r} is registered twice ({_ENGINES[name].__module__}, {cls.__module__})")
        cls.name = name
        _ENGINES[name] = cls
        return cls
    return add


def _discover() -> None:
    """Import every module (and sub-package) of optimizer/engines/ once: importing an adapter registers it."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("servetune.optimizer.engines")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def names() -> tuple[str, ...]:
    """Every engine's name: simulated ones first (the default a study starts from), then by name."""
    _discover()
    return tuple(sorted(_ENGINES, key=lambda n: (not _ENGINES[n].simulated, n)))


def engine_class(name: str) -> type[Engine]:
    """The class registered as ``name``: its traits without building an engine. ValueError when unknown."""
    _discover()
    try:
        return _ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r} (have: {', '.join(names())})") from None


def get_engine(name: str, command: list[str] | None = None, version: str | None = None) -> Engine:
    """The engine ``name``, launched by ``command`` (default: its catalog's) with the flag mapping of
    ``version`` (default: its catalog's)."""
    return engine_class(name)(command, version)


def simulated(name: str) -> bool:
    """Whether ``name`` is servetune's own simulated engine (no GPU, its numbers modelled); a name no engine
    answers to (an old record) is not."""
    _discover()
    cls = _ENGINES.get(name)
    return bool(cls and cls.simulated)
