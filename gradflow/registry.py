"""A small name -> object registry shared by models, statistics, probes and figures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gradflow.errors import unknown_name
from gradflow.plugins import IMPORTS, import_package, load_plugins

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a :class:`GradflowError` with suggestions.

    The first time it is read (any method but :meth:`register`), every module of its
    ``package`` is imported and so are the installed plug-ins (:mod:`gradflow.plugins`),
    so that whatever they register is there.

    Args:
        kind: what it holds, named in messages (``"figure"``).
        package: the package whose modules register into it (``"gradflow.plots"``).
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self._package = package
        self._complete = False
        self._importing = False
        self._items: dict[str, T] = {}

    def _complete_once(self) -> None:
        if self._complete:
            return
        with IMPORTS:
            if self._complete or self._importing:  # read by a module these imports import
                return
            self._importing = True
            try:
                if self._package is not None:
                    import_package(self._package)
                load_plugins()
            finally:
                self._importing = False
            self._complete = True

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are unique)."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as ``name``."""
        self._complete_once()
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        self._complete_once()
        return list(self._items)

    def summary(self, name: str) -> str:
        """First line of the registered object's description: its ``doc`` attribute where
        it has a text one (a statistic), else its docstring."""
        obj = self.get(name)
        own = getattr(obj, "doc", None)
        doc = own if isinstance(own, str) else getattr(obj, "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __contains__(self, name: object) -> bool:
        self._complete_once()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._complete_once()
        return iter(self._items)

    def __len__(self) -> int:
        self._complete_once()
        return len(self._items)
