"""The method registry: one entry per clustering method, looked up by name from configs.

Adding a method means adding one module under ``agcpipe/methods/`` that defines a :class:`~.base.Method`
subclass decorated with :func:`register`: every module of the package is imported on first lookup.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError

Family = Literal["baseline", "non-parametric", "decoupled", "joint"]

# modules of this package that define no method
_NOT_METHODS = {"base", "registry"}


class Params(BaseModel):
    """Base of every method's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    family: Family
    cls: type
    params: type[Params]
    description: str = ""
    #: modules (dotted names) whose source is part of this method's train-stage code version
    code: tuple[str, ...] = field(default_factory=tuple)

    def validate_params(self, raw: dict[str, Any] | None) -> dict[str, Any]:
        try:
            return self.params.model_validate(raw or {}).model_dump(mode="json")
        except ValidationError as e:
            parts = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                if err["type"] == "extra_forbidden":
                    known = ", ".join(self.params.model_fields)
                    parts.append(
                        f"unknown parameter 'method.params.{loc}' for method '{self.name}' (known: {known})"
                    )
                else:
                    parts.append(f"method.params.{loc}: {err['msg']} (got {err.get('input')!r})")
            raise ConfigError("; ".join(parts)) from None

    def build(self, params: dict[str, Any] | None = None):
        return self.cls(self.validate_params(params))


_REGISTRY: dict[str, MethodEntry] = {}
_loaded = False


def register(name: str, *, family: Family, params: type[Params], description: str = "", code: tuple[str, ...] = ()):
    """Class decorator registering a :class:`~.base.Method` subclass under ``name``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        cls.family = family
        _REGISTRY[name] = MethodEntry(
            name=name,
            family=family,
            cls=cls,
            params=params,
            description=description or (cls.__doc__ or "").strip().splitlines()[0] if (description or cls.__doc__) else "",
            code=(cls.__module__, *code),
        )
        return cls

    return deco


def _load_builtin() -> None:
    """Import every method module of this package (each registers its methods); once per process."""
    global _loaded
    if not _loaded:
        from . import __path__ as pkg_path

        for info in pkgutil.iter_modules(pkg_path):
            if info.name not in _NOT_METHODS and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")
        _loaded = True


def get(name: str) -> MethodEntry:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(known())}") from None


def known() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def entries() -> list[MethodEntry]:
    _load_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
