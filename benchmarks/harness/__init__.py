"""What the benchmark scripts share, one copy of each:

- :mod:`.env`: the header every result starts with (date, machine, torch, git commit) and
  the options every script takes;
- :mod:`.report`: robust summaries (median, quartiles, min-max), the plain-text table, the
  ratio columns and headlines, JSON output;
- :mod:`.workloads`: the training workloads (a zoo model or a third-party one, RMSprop, one
  fixed random batch; an MLP), so every script times the same training step;
- :mod:`.tools`: what watches a training step (:class:`~.tools.Tool`;
  :class:`~.tools.GradflowTool` is the recorder) and the named variants built from them;
- :mod:`.timing`: rigs (a trainer and its tool), the wall-clock and CUDA-event timers,
  interleaved, paired trials (:func:`~.timing.paired_trials`) and their summaries, and the
  best of interleaved repeats of single calls (:func:`~.timing.interleaved_best`);
- :mod:`.process`: resident memory (peak RSS measured in a fresh process too), hooks
  attached to a model and its optimizer, dataset sizes of a run file.

The scripts import it as ``harness`` (Python puts a script's own folder first on
``sys.path``); run them from the repository root, e.g. ``python benchmarks/overhead.py``.
"""
