"""What the parts of the :class:`~gradflow.recorder.Recorder` share: its state, set up by
:meth:`Recorder.__init__ <gradflow.recorder.Recorder>`, and the methods one part calls in
another (declared here for the type checker only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from gradflow.budget import BudgetSchedule
from gradflow.layers import LayerSpec
from gradflow.probes import Attachment, CallLog, Probe
from gradflow.recorder.rows import RowState
from gradflow.schedule import Schedule
from gradflow.writer import NullWriter, WriterThread


class RecorderBase:
    """The state of a Recorder that its hooks, its rows and its layout all use."""

    model: nn.Module
    path: Path
    probes: tuple[str, ...]
    schedule: Schedule
    _budget: BudgetSchedule | None  # the schedule, when it keeps an overhead budget
    _schedule_desc: str  # the schedule as the run file describes it
    step: int
    epoch: int
    rank: int
    world_size: int
    _writes: bool  # this process writes the run file
    _optimizers: list[Any]  # torch optimizers, or optimizer-like objects measured around
    _writer: WriterThread | NullWriter
    _group: Any  # gradflow's own process group (for reduce_activations), or None
    _reduce_activations: bool
    _resume: tuple[int, int] | None
    _config: dict[str, Any]
    _overwrite: bool
    _epoch_stats: bool
    _flush: tuple[int, float]
    _probes: list[Probe]
    _step_probes: list[Probe]
    _call_probes: list[Probe]
    _active: bool  # the current step is recorded
    _closed: bool
    _inert: bool  # a rank that neither writes nor joins collectives: no hooks at all
    _log: CallLog  # layer calls since the last optimizer step
    _row_logs: list[CallLog]  # those of the row being measured, per step
    _rows: RowState
    _layers: list[LayerSpec]  # the recorded layers (in forward order once the layout is sent)
    _layout_sent: bool  # the run file's layout went to the writer
    _call_order: dict[str, int]  # first training call of each module, until then
    _grads_at_attach: dict[int, tuple[Any, int]]  # each gradient there was, and its version
    _layer_handles: list[Any]
    _order_handles: list[Any]
    _module_ids: set[int]  # the model's modules when its layers were last derived
    _forward_seen: bool  # a forward of the model ran since the Recorder attached
    _hook_s: float
    _stats_s: float
    _t0: float

    if TYPE_CHECKING:

        def _ensure_layout(self) -> None: ...
        def _check_layout(self, always: bool = False) -> None: ...
        def _layout_changed(self) -> bool: ...
        def _rederive(self) -> None: ...
        def _attachment(self) -> Attachment: ...
        def _hook_layers(self) -> None: ...
        def _begin(self, index: int, *, measure: bool) -> None: ...
        def _end(
            self, index: int, *, stepped: bool, has_update: bool, skipped: bool = False
        ) -> None: ...
        def _measure_before(self, index: int) -> None: ...
        def _close_step(self, *, carry: bool = False, split: int = 0) -> None: ...
        def _finalize_row(self) -> None: ...
        def _end_row(self) -> None: ...
        def _wait_for_writer(self, doing: str, timeout: float = 60.0) -> None: ...
