"""The name -> object registry, and the global registries built on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gradflow.em.metrics import LOSSES
from gradflow.em.models import _MODELS
from gradflow.errors import GradflowError
from gradflow.plots import FIGURES, TABLES
from gradflow.registry import Registry
from gradflow.statistics import STATISTICS


def alpha() -> None:
    """The first widget.

    More about it, on lines the summary leaves out.
    """


def beta() -> None:
    """
    The second widget, its docstring opening on a new line.
    """


def gamma() -> None:
    pass


@pytest.fixture
def widgets() -> Registry[Callable[[], None]]:
    registry: Registry[Callable[[], None]] = Registry("widget")
    for fn in (alpha, beta, gamma):
        assert registry.register(fn.__name__)(fn) is fn  # the decorator keeps the function
    return registry


def test_get_names_contains_len_and_iter(widgets: Registry[Callable[[], None]]) -> None:
    assert widgets.get("beta") is beta
    assert widgets.names() == ["alpha", "beta", "gamma"]  # registration order
    assert list(widgets) == widgets.names()
    assert len(widgets) == 3 and len(Registry("empty")) == 0
    assert "gamma" in widgets
    assert "delta" not in widgets and 1 not in widgets and None not in widgets


def test_names_is_a_copy(widgets: Registry[Callable[[], None]]) -> None:
    widgets.names().append("delta")
    assert "delta" not in widgets and len(widgets) == 3


def test_summary_is_the_first_docstring_line(widgets: Registry[Callable[[], None]]) -> None:
    assert widgets.summary("alpha") == "The first widget."
    assert widgets.summary("beta") == "The second widget, its docstring opening on a new line."
    assert widgets.summary("gamma") == ""  # no docstring


def test_registering_a_name_twice_raises_and_keeps_the_first(
    widgets: Registry[Callable[[], None]],
) -> None:
    with pytest.raises(ValueError, match="widget 'alpha' registered twice"):
        widgets.register("alpha")(gamma)
    assert widgets.get("alpha") is alpha and len(widgets) == 3


def test_unknown_name_suggests_close_names(widgets: Registry[Callable[[], None]]) -> None:
    with pytest.raises(GradflowError) as err:
        widgets.get("alpah")
    message = str(err.value)
    assert message.startswith("unknown widget 'alpah'; did you mean 'alpha'?")
    assert "(known: alpha, beta, gamma)" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no KeyError shown


def test_unknown_name_without_a_close_match_lists_the_known(
    widgets: Registry[Callable[[], None]],
) -> None:
    with pytest.raises(GradflowError, match="did you mean") as err:
        widgets.summary("betta")
    assert "'beta'" in str(err.value)
    with pytest.raises(GradflowError) as err:
        widgets.get("zzz")
    assert str(err.value) == "unknown widget 'zzz' (known: alpha, beta, gamma)"


def test_a_long_listing_is_cut_after_twelve_names() -> None:
    registry: Registry[int] = Registry("number")
    for i in range(20):
        registry.register(f"n{i:02d}")(i)
    with pytest.raises(GradflowError) as err:
        registry.get("x")
    assert str(err.value).endswith(
        "(known: " + ", ".join(f"n{i:02d}" for i in range(12)) + ", ...)"
    )


GLOBAL: dict[str, Registry[Any]] = {
    "model": _MODELS,
    "statistic": STATISTICS,
    "figure": FIGURES,
    "table": TABLES,
    "loss": LOSSES,
}


@pytest.mark.parametrize("kind", list(GLOBAL))
def test_global_registries_are_filled_and_summarised_in_one_line(kind: str) -> None:
    registry = GLOBAL[kind]
    assert registry.kind == kind
    assert len(registry) > 0
    for name in registry:
        summary = registry.summary(name)
        assert summary and summary == summary.strip() and "\n" not in summary, name


def test_a_statistic_summary_is_its_own_description() -> None:
    for key in STATISTICS:
        assert STATISTICS.summary(key) == STATISTICS.get(key).doc
