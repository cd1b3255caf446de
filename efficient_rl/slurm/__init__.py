"""Running recipes on Slurm: `efficient-rl submit` (submit.py) and `efficient-rl jobs` (jobs.py).
The job script itself is efficient_rl/slurm/job.sbatch; the Ray readiness check it runs is Ray code, so it is
efficient_rl/cluster/ray_ready.py. docs/slurm.md walks through all of it."""
