"""A run as a labelled ``xarray.Dataset`` (``Run.to_xarray()``), ready for netCDF, and as a
long pandas table (``Run.to_dataframe()``).

Variables, by the statistic's name with ``/`` written ``__`` (netCDF and HDF5 read ``/`` as
a group separator; :func:`variable_name` and :func:`statistic_name` convert)::

    param__grad_norm, grad_output__norm, ...   float32 (step, layer)   per-step statistics
    epoch__update_abs_mean, ...                float32 (epoch, layer)  per-epoch updates
    metric__val_loss, ...                      float64 (epoch)         per-epoch metrics
    scalar__lr, ...                            float64 (step)          other logged scalars

Coordinates: ``step`` (the optimizer step of each recorded row) with ``epoch_of_step``,
``time`` (seconds since the recorder started) and ``loss``; ``epoch`` (the closed epochs)
with ``end_step``; ``layer`` (names, in the file's order) with ``kind``, ``layer_type``,
``depth``, ``stage`` (the group the browser report's layer axis labels, e.g. ``down2.1``
or ``transformer.h.3``) and ``n_params``. Each
variable's ``statistic`` attribute holds its original name. The dataset's attributes are
the run file's (``gradflow_version``, ``created``, ``device``, ...), the config as JSON
(``config``) and flattened (``config.optimizer.lr``): numbers and text only, so that netCDF
writers take them (booleans as 0 / 1, lists and nulls as their JSON text).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from gradflow.errors import GradflowError
from gradflow.plots.selection import layer_groups
from gradflow.runfile import Run
from gradflow.sweeps.structure import flat_items

SEPARATOR = "__"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]")  # outside the characters netCDF-3 names allow


def variable_name(stat: str) -> str:
    """``param/grad_norm`` -> ``param__grad_norm``."""
    return stat.replace("/", SEPARATOR, 1)


def statistic_name(variable: str) -> str:
    """``param__grad_norm`` -> ``param/grad_norm`` (the inverse of :func:`variable_name`)."""
    return variable.replace(SEPARATOR, "/", 1)


def _import_xarray() -> Any:
    try:
        import xarray
    except ImportError:
        raise GradflowError(
            "Run.to_xarray() needs xarray: pip install 'gradflow-skips[notebook]'"
        ) from None
    return xarray


def netcdf_value(value: Any) -> str | int | float:
    """``value`` as a netCDF attribute: text and numbers as they are, booleans as 0 / 1,
    anything else (lists, null) as its JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _attrs(run: Run) -> dict[str, str | int | float]:
    attrs = {
        _UNSAFE.sub("_", key): netcdf_value(value)
        for key, value in run.attrs.items()
        if key != "config"
    }
    attrs["source_file"] = run.path.name
    attrs["config"] = json.dumps(run.config, default=str)
    for key, value in flat_items(run.config):
        attrs[_UNSAFE.sub("_", f"config.{key}")] = netcdf_value(value)
    return attrs


def _layer_coords(run: Run) -> dict[str, tuple[str, Any, dict[str, str]]]:
    ordered = sorted(run.layers, key=lambda lay: (lay.depth, lay.index))
    stage = [""] * run.n_layers
    for group in layer_groups(ordered):
        for lay in ordered[group.start : group.stop]:
            stage[lay.index] = group.name
    layers = run.layers
    return {
        "layer": ("layer", [lay.name for lay in layers], {"long_name": "layer (module) name"}),
        "kind": ("layer", [lay.kind for lay in layers], {"long_name": "layer kind"}),
        "layer_type": ("layer", [lay.type for lay in layers], {"long_name": "module class"}),
        "depth": (
            "layer",
            np.array([lay.depth for lay in layers], np.int64),
            {"long_name": "forward order (input first)"},
        ),
        "stage": ("layer", stage, {"long_name": "group of layers the report labels"}),
        "n_params": (
            "layer",
            np.array([lay.n_params for lay in layers], np.int64),
            {"long_name": "trainable parameters"},
        ),
    }


def to_xarray(run: Run) -> Any:
    """The run as an ``xarray.Dataset`` (layout in the module docstring).

    Args:
        run: an open run (a live one: the rows committed so far).

    Returns:
        An ``xarray.Dataset``; ``ds.to_netcdf(path, engine="h5netcdf")`` writes it.
    """
    xr = _import_xarray()
    from gradflow.plots.style import stat_label

    coords: dict[str, Any] = {
        "step": ("step", run.steps, {"long_name": "optimizer step"}),
        "epoch_of_step": ("step", run.epoch, {"long_name": "epoch of the step"}),
        "time": ("step", run.time, {"units": "s", "long_name": "time since the recorder started"}),
        "loss": ("step", run.loss, {"long_name": "logged loss (NaN: none logged)"}),
        "epoch": ("epoch", run.epochs, {"long_name": "closed epoch"}),
        "end_step": ("epoch", run.epoch_end_step, {"long_name": "steps done at the epoch's end"}),
        **_layer_coords(run),
    }
    data: dict[str, Any] = {}
    for probe, names in [*run.probes().items(), ("epoch", run.epoch_stats())]:
        dims = ("epoch" if probe == "epoch" else "step", "layer")
        for name in names:
            stat = f"{probe}/{name}"
            attrs = {"statistic": stat, "long_name": stat_label(stat)}
            data[variable_name(stat)] = (dims, run.stat(probe, name), attrs)
    for kind, dim, series in (("metric", "epoch", run.metrics), ("scalar", "step", run.scalars)):
        for name, values in series.items():
            key = _UNSAFE.sub("_", f"{kind}{SEPARATOR}{name}")
            data[key] = (dim, values, {"long_name": f"{kind} {name}"})
    return xr.Dataset(data, coords=coords, attrs=_attrs(run))


def to_dataframe(run: Run) -> Any:
    """All per-step statistics of ``run`` in long format.

    Args:
        run: an open run file.

    Returns:
        a ``pandas.DataFrame`` with columns step, layer, probe, stat, value (one row per
        recorded step, layer and statistic).
    """
    import pandas as pd

    steps = run.steps
    names = np.array(run.layer_names, dtype=object)
    frames = [
        pd.DataFrame(
            {
                "step": np.repeat(steps, run.n_layers),
                "layer": np.tile(names, len(steps)),
                "probe": probe,
                "stat": stat,
                "value": run.stat(probe, stat).reshape(-1),
            }
        )
        for probe, stats in run.probes().items()
        for stat in stats
    ]
    if not frames:
        return pd.DataFrame(columns=["step", "layer", "probe", "stat", "value"])
    return pd.concat(frames, ignore_index=True)
