"""Names that are part of the run-file format and that light modules (the CLI, the training
configuration) need without the statistics' numpy: the per-step probes and the per-epoch
update statistics."""

STEP_PROBES = ("param", "activation", "grad_output")
EPOCH_STATS = ("update_abs_mean", "update_ratio", "update_norm", "update_abs_max")
