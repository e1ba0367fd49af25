"""Evaluation of a model on validation rows at test-time loop counts: summed losses, bits per byte,
the fitted L(T) = L_inf + k exp(-z T), and the report. Below the trainer: it knows forwards and
batches, not engines or checkpoints."""
