"""Where registrations come from besides the modules a program imports: every module of a
registry's package (a new module in ``gradflow/probes/`` or ``gradflow/plots/`` needs no
``__init__`` edit) and the installed plug-ins, the entry points of group
``gradflow.plugins``. A :class:`~gradflow.registry.Registry` imports both the first time it
is read, so that every name is known before one is resolved.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
import warnings
from importlib.metadata import EntryPoint, entry_points

GROUP = "gradflow.plugins"
# Held while registrations are imported, so that a thread reading a registry waits for the
# imports another thread started; re-entrant: an imported module may read a registry.
IMPORTS = threading.RLock()


class PluginWarning(UserWarning):
    """An installed plug-in could not be loaded; gradflow goes on without it."""


def import_package(name: str) -> None:
    """Import every module of package ``name``, each registering what it defines.

    Args:
        name: a package, e.g. ``"gradflow.plots"``.
    """
    package = importlib.import_module(name)
    for module in pkgutil.iter_modules(package.__path__, prefix=f"{name}."):
        importlib.import_module(module.name)


class _Plugins:
    """The entry points loaded in this process: once, whichever thread asks first."""

    def __init__(self) -> None:
        self.loaded: list[str] | None = None

    def load(self) -> list[str]:
        with IMPORTS:
            if self.loaded is None:
                self.loaded = []
                for entry in entry_points(group=GROUP):
                    if _load(entry):
                        self.loaded.append(entry.name)
            return list(self.loaded)


_PLUGINS = _Plugins()


def load_plugins() -> list[str]:
    """Import every installed plug-in, once per process (later calls import nothing).

    An entry point names a module (``my_plugin``), whose import registers statistics,
    probes, figures or model presets with the usual decorators, or a function
    (``my_plugin:register``) that gradflow calls without arguments to register them. One
    that fails gives a :class:`PluginWarning` naming it and the error, and is left out.

    Returns:
        The names of the entry points loaded, in the order they were loaded.
    """
    return _PLUGINS.load()


def _load(entry: EntryPoint) -> bool:
    """Load one entry point; whether it loaded."""
    try:
        target = entry.load()
        if entry.attr is not None:
            target()
    except Exception as err:  # a broken plug-in must not stop gradflow
        text = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
        message = f"plug-in {entry.name!r} ({entry.value}) not loaded: {reason}"
        warnings.warn(message, PluginWarning, stacklevel=3)
        return False
    return True
