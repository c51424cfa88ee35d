"""What a set of runs varies: the independent settings (factors), the seed, and the settings
that follow from them, found from the configs alone.

An ablation of 4 models x 2 optimizers x 5 seeds differs in dozens of config keys: the
model's name and every field of its architecture, the optimizer's name, learning rate,
momentum, ... and the command line. Most follow from a few: every architecture field from
the model's name, momentum from the optimizer's, the learning rate from model and optimizer
together. :func:`find_structure` picks as factors the keys that explain the most others, one
at a time, skipping any key that follows from those picked; the seed (a key named ``seed``)
is the replicate, unless it too follows from the factors.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PROVENANCE = frozenset({"command"})  # the command line repeats the settings and names the file
SEED = "seed"


def flat_items(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.key, leaf)`` for every leaf of nested mappings; an empty mapping has none
    (``overrides: {}`` and ``overrides: {depth: 3}`` differ in ``overrides.depth`` only)."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flat_items(value, f"{name}.")
        else:
            yield name, value


def canonical(value: Any) -> str:
    """A config value as comparable text (lists and mappings by content)."""
    return json.dumps(value, sort_keys=True, default=str)


def level_order(value: Any) -> tuple[int, float, str]:
    """Sort key of a setting's values: numbers by size, then text, missing values last."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (2, 0.0, "") if value is None else (1, 0.0, canonical(value))


@dataclass(frozen=True)
class Structure:
    """How runs differ.

    ``factors``: the independent settings, most explaining first; ``seed``: the replicate
    key (None where no seed varies independently); ``follows``: every other differing key
    with the smallest set of factors (and seed) it is a function of; ``levels``: each
    factor's and the seed's values, sorted; ``cells``: the factor combinations present, of
    ``possible`` (the product of the factors' level counts).
    """

    n_runs: int
    factors: list[str]
    seed: str | None
    follows: dict[str, list[str]]
    levels: dict[str, list[Any]]
    cells: int
    possible: int

    @property
    def columns(self) -> list[str]:
        """The settings a table of the runs shows: factors, seed, then the keys that
        follow only from several factors together (e.g. a learning rate set per model and
        optimizer)."""
        seed = [self.seed] if self.seed else []
        joint = [key for key, given in self.follows.items() if len(given) > 1]
        return [*self.factors, *seed, *joint]

    def describe(self) -> str:
        """One line: ``model.name (4) x optimizer.name (2) x seed (5): 40 runs, every
        combination``."""
        keys = [*self.factors, *([self.seed] if self.seed else [])]
        design = " x ".join(f"{key} ({len(self.levels[key])})" for key in keys)
        if not self.factors:
            return f"{design or 'no setting differs'}: {self.n_runs} runs"
        missing = self.possible - self.cells
        complete = "every combination" if not missing else f"{missing} combinations missing"
        return f"{design}: {self.n_runs} runs, {complete}"

    def follow_notes(self) -> list[str]:
        """Per factor, the keys that follow from it alone: ``model.name sets model.depth, ...``."""
        notes = []
        for factor in [*self.factors, *([self.seed] if self.seed else [])]:
            keys = [key for key, given in self.follows.items() if given == [factor]]
            if keys:
                notes.append(f"{factor} sets {', '.join(keys)}")
        return notes


def _partition(values: Sequence[str]) -> tuple[int, ...]:
    ids: dict[str, int] = {}
    return tuple(ids.setdefault(v, len(ids)) for v in values)


def _follows(key: tuple[int, ...], given: Sequence[tuple[int, ...]]) -> bool:
    """Whether the partition ``key`` is a function of the joint partitions ``given``."""
    seen: dict[tuple[int, ...], int] = {}
    for i, value in enumerate(key):
        if seen.setdefault(tuple(p[i] for p in given), value) != value:
            return False
    return True


def _is_text(values: Sequence[Any]) -> bool:
    return all(isinstance(v, str) for v in values)


def find_structure(configs: Sequence[Mapping[str, Any]]) -> Structure:
    """The factors, seed and dependent settings of runs with these configs.

    Args:
        configs: one config (nested mappings) per run.

    Returns:
        The :class:`Structure`; keys named ``command`` (provenance) are left out.
    """
    flat = [dict(flat_items(config)) for config in configs]
    keys = sorted({key for f in flat for key in f} - PROVENANCE)
    keys = [k for k in keys if k.rsplit(".", 1)[-1] not in PROVENANCE]
    raw = {key: [f.get(key) for f in flat] for key in keys}
    parts = {key: _partition([canonical(v) for v in raw[key]]) for key in keys}
    differing = [key for key in keys if max(parts[key], default=0) > 0]
    n = len(configs)

    def n_levels(key: str) -> int:
        return max(parts[key]) + 1

    seeds = sorted((k for k in differing if k.rsplit(".", 1)[-1] == SEED), key=len)
    seed = seeds[0] if seeds else None
    others = [k for k in differing if k != seed]
    # Keys that follow from the seed are the seed's (a data split chosen by it); a key that
    # also determines the seed (one value per seed) is a setting unless its name says seed,
    # and counts only where nothing else varies (two runs at two learning rates and seeds).
    along: list[str] = []
    if seed is not None:
        derived = [k for k in others if _follows(parts[k], [parts[seed]])]
        along = [
            k
            for k in derived
            if _follows(parts[seed], [parts[k]]) and SEED not in k.rsplit(".", 1)[-1]
        ]
        others = [k for k in others if k not in derived]
    spread = [k for k in others if n_levels(k) < n or n <= 2]
    explains = {k: sum(_follows(parts[o], [parts[k]]) for o in spread if o != k) for k in others}

    def importance(k: str) -> tuple[bool, int, int, bool, bool, int, str]:
        return (
            n_levels(k) == n and n > 2,  # a key unique to every run identifies, not sets
            -explains.get(k, 0),
            n_levels(k),
            k.rsplit(".", 1)[-1] != "name",
            not _is_text(raw[k]),
            k.count("."),
            k,
        )

    factors: list[str] = []
    for key in sorted(others, key=importance) or sorted(along, key=importance):
        if not _follows(parts[key], [parts[f] for f in factors]):
            factors.append(key)
    if seed is not None and _follows(parts[seed], [parts[f] for f in factors]):
        seed = None  # one seed per setting: not a replicate
    given = [*factors, *([seed] if seed else [])]
    follows: dict[str, list[str]] = {}
    for key in differing:
        if key in given:
            continue
        for size in range(1, len(given) + 1):
            found = next(
                (
                    list(subset)
                    for subset in itertools.combinations(given, size)
                    if _follows(parts[key], [parts[s] for s in subset])
                ),
                None,
            )
            if found is not None:
                follows[key] = found
                break
    levels = {
        key: sorted({canonical(v): v for v in raw[key]}.values(), key=level_order) for key in given
    }
    cells = len({tuple(parts[f][i] for f in factors) for i in range(n)})
    possible = 1
    for key in factors:
        possible *= len(levels[key])
    return Structure(n, factors, seed, follows, levels, cells, possible)
