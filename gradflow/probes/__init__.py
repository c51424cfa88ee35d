"""Probes: what is measured where. One module per probe behind one protocol
(:class:`~gradflow.probes.base.Probe`), registered in :data:`PROBES`, which the recorder and
the writer read; :mod:`gradflow.names` lists the built-in ones for light modules. A new
module here needs no line in this file: :data:`PROBES` imports every module of the package
the first time it is read."""

from gradflow.probes.activation import ActivationProbe
from gradflow.probes.base import PROBES, Attachment, Block, Check, LayerMap, Probe, register
from gradflow.probes.calls import CallLog, CallProbe
from gradflow.probes.grad_output import GradOutputProbe
from gradflow.probes.param import ParamProbe, ParamReductions
from gradflow.probes.skip import SkipProbe
from gradflow.probes.snapshot import Snapshot

__all__ = [
    "PROBES",
    "ActivationProbe",
    "Attachment",
    "Block",
    "CallLog",
    "CallProbe",
    "Check",
    "GradOutputProbe",
    "LayerMap",
    "ParamProbe",
    "ParamReductions",
    "Probe",
    "SkipProbe",
    "Snapshot",
    "register",
]
