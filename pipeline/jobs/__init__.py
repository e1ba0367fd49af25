"""What is built on the training library: the launcher of `parcae train`, Slurm jobs and sweeps of runs,
the demo, `parcae eval` and `generate` of saved models, sweep summaries, compute planning and the
TensorBoard server.

The boundary with `pipeline.cli`: a job returns data (`evaluate.Written`, `generate.Generated`) and the
command prints it. The demo, sweeps, Slurm status and `tb` still print from here.
"""
