"""Run files in a browser: a self-contained interactive HTML report and a live view.

:func:`build_report` writes one HTML file (plotly's JavaScript inlined, no network);
:func:`serve` serves the same page over HTTP and redraws it as the run files grow.
Nothing here imports torch.
"""

from gradflow.report.data import payload
from gradflow.report.page import build_report, page
from gradflow.report.server import serve

__all__ = ["build_report", "page", "payload", "serve"]
