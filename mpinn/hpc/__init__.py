"""The HPC workflow: bench (phase timings), scale (a series of bench runs), report (tables, plots,
alpha-beta model), perfmodel (the model's pure functions), jobs (SLURM and PBS job files)."""
