"""Names that are part of the run-file format and that light modules (the CLI, the training
configuration) need without the statistics' numpy: the probes gradflow registers, those
recorded by default, and the per-epoch update statistics."""

# Every probe gradflow itself registers in gradflow.probes.PROBES (a step probe, param, and
# the call probes activation, grad_output and skip, which measures the zoo's FCNs only).
BUILTIN_PROBES = frozenset({"param", "activation", "grad_output", "skip"})
# What the Recorder and `gradflow record` record unless told otherwise, in file order.
DEFAULT_PROBES = ("param", "activation", "grad_output")
EPOCH_STATS = ("update_abs_mean", "update_ratio", "update_norm", "update_abs_max")
