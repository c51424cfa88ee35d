"""Names that are part of the run-file format and that light modules (the CLI, the training
configuration) need without the statistics' numpy: the probes gradflow registers, those
recorded by default, and the per-epoch update statistics."""

# Every probe gradflow itself registers in gradflow.probes.PROBES (a step probe, param, and
# the call probes activation and grad_output).
BUILTIN_PROBES = frozenset({"param", "activation", "grad_output"})
# What the Recorder and `gradflow record` record unless told otherwise, in file order.
DEFAULT_PROBES = ("param", "activation", "grad_output")
EPOCH_STATS = ("update_abs_mean", "update_ratio", "update_norm", "update_abs_max")
