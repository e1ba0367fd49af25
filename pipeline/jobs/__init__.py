"""What is built on the training library: Slurm jobs and sweeps of runs, the demo, `parcae eval` of saved
models, sweep summaries, compute planning and the TensorBoard server."""
