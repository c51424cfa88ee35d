"""Registrations that no ``__init__`` imports: a new module in ``gradflow/plots/`` or
``gradflow/probes/`` (here: a folder added to the package's path) is found by name, and the
entry points of group ``gradflow.plugins`` of a distribution on ``sys.path`` are loaded once,
a broken one with one warning. ``tests/test_extending.py`` installs a real plug-in with pip
and uses it from the command line."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gradflow.plots
import gradflow.probes
from gradflow import plugins
from gradflow.em.models import _MODELS
from gradflow.plots.catalog import FIGURES, TABLES
from gradflow.plugins import PluginWarning, load_plugins
from gradflow.probes import PROBES
from gradflow.registry import Registry
from gradflow.statistics import STATISTICS

REGISTRIES: tuple[Registry[Any], ...] = (STATISTICS, PROBES, FIGURES, TABLES, _MODELS)

FIGURE_MODULE = '''
from matplotlib.figure import Figure

from gradflow.plots import FIGURES


@FIGURES.register("dropped-in")
def dropped_in(runs, *, title=None):
    """A figure of a module no __init__ imports."""
    return Figure()
'''

PROBE_MODULE = '''
from gradflow.kernels import CALL_COLUMNS
from gradflow.probes import CallProbe, register


@register
class DroppedIn(CallProbe):
    """A probe of a module no __init__ imports."""

    name = "dropped_in"
    columns = CALL_COLUMNS
'''

PLUGIN = """
from gradflow.statistics import statistic

calls = []


@statistic("param", "plugin_stat", "a plug-in's statistic")
def plugin_stat(r):
    return r["g_sq"]


def register():
    calls.append(1)
    statistic("param", "plugin_fn_stat", "registered by a function")(plugin_stat.compute)
"""

ENTRY_POINTS = """
[gradflow.plugins]
demo = demo_plugin
demo_fn = demo_plugin:register
broken = demo_missing_module
"""


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registries as if never read (copies, put back afterwards) and no plug-in loaded yet."""
    for registry in REGISTRIES:
        len(registry)  # read once: its package's modules register into it, not into the copy
        monkeypatch.setattr(registry, "_items", dict(registry._items))
        monkeypatch.setattr(registry, "_complete", False)
    monkeypatch.setattr(plugins._PLUGINS, "loaded", None)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if "dropped_in" in name or "demo_" in name:
            del sys.modules[name]


def drop_in(monkeypatch: pytest.MonkeyPatch, package: Any, folder: Path, source: str) -> None:
    """``source`` as module ``dropped_in_module`` of ``package``, in a folder of its path."""
    folder.mkdir()
    (folder / "dropped_in_module.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])


def test_a_module_dropped_into_plots_is_found(
    fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    drop_in(monkeypatch, gradflow.plots, tmp_path / "plots", FIGURE_MODULE)
    assert "gradflow.plots.dropped_in_module" not in sys.modules
    assert FIGURES.summary("dropped-in") == "A figure of a module no __init__ imports."
    assert "gradflow.plots.dropped_in_module" in sys.modules
    assert {"gradient-heatmap", "dropped-in"} <= set(FIGURES.names())


def test_a_module_dropped_into_probes_is_found(
    fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    drop_in(monkeypatch, gradflow.probes, tmp_path / "probes", PROBE_MODULE)
    assert PROBES.get("dropped_in").__name__ == "DroppedIn"
    assert "param" in PROBES


def test_registering_does_not_read(fresh: None) -> None:
    # Registering is what the imports do: it must not start them again.
    FIGURES.register("early")(len)
    assert not FIGURES._complete
    assert "early" in FIGURES and FIGURES._complete


@pytest.fixture
def site(fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder on ``sys.path`` holding an installed distribution with three entry points."""
    (tmp_path / "demo_plugin.py").write_text(PLUGIN, encoding="utf-8")
    info = tmp_path / "demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_points_load_once_at_the_first_read(site: Path) -> None:
    assert "demo_plugin" not in sys.modules
    message = (
        r"^plug-in 'broken' \(demo_missing_module\) not loaded: "
        r"ModuleNotFoundError: No module named 'demo_missing_module'$"
    )
    with pytest.warns(PluginWarning, match=message) as caught:
        assert "param/plugin_stat" in STATISTICS
    assert len(caught) == 1
    assert "param/plugin_fn_stat" in STATISTICS
    assert load_plugins() == ["demo", "demo_fn"]
    assert sys.modules["demo_plugin"].calls == [1]  # the function ran once
    assert PROBES.names() and load_plugins() == ["demo", "demo_fn"]
    assert sys.modules["demo_plugin"].calls == [1]


def test_a_plug_in_that_raises_leaves_the_others(site: Path) -> None:
    (site / "demo_missing_module.py").write_text("raise RuntimeError('no GPU here\\nsecond')\n")
    with pytest.warns(PluginWarning, match=r"'broken' .*: RuntimeError: no GPU here$"):
        assert load_plugins() == ["demo", "demo_fn"]
    assert "param/plugin_stat" in STATISTICS


def test_a_second_thread_waits_for_the_imports(site: Path) -> None:
    # demo_plugin takes a second to import; a read meanwhile sees its registrations.
    source = (site / "demo_plugin.py").read_text()
    (site / "demo_plugin.py").write_text("import time\ntime.sleep(1.0)\n" + source)
    first = threading.Thread(target=lambda: "anything" in STATISTICS)
    with pytest.warns(PluginWarning):
        first.start()
        time.sleep(0.3)
        assert "demo_plugin" in sys.modules and "param/plugin_stat" not in STATISTICS._items
        assert "param/plugin_stat" in STATISTICS
        first.join()
