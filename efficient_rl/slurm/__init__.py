"""Running recipes on Slurm: `efficient-rl submit` (submit.py), `efficient-rl jobs` (jobs.py) and
the Ray readiness check the job script runs (ray_ready.py). The job script itself is
slurm/job.sbatch; docs/slurm.md walks through all of it."""
