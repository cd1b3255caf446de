"""Studies: several recipes (or recipe x overrides) x seeds, trained and evaluated alike, in one report.

`efficient-rl study run|status|check STUDY.yaml` (alias `sweep`); docs/studies.md.

<output_dir>/<name>/
  study.yaml            the study as loaded (written when it first runs)
  runs/<method>-s<seed>/  each run's directory (efficient_rl/run/checkpoint.py); runs/slurm/: their Slurm jobs
  status/<run>.json     the last launch of each run: how (local pid or Slurm job), and how it ended
  logs/<run>.log        a local run's output, every attempt appended
  eval/                 `efficient-rl eval`'s outputs for every evaluated checkpoint (its cache included)
  report.md, report.json, frontier.png   the study's report
"""
