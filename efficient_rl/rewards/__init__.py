"""Built-in verifiable reward plugins (installed as `efficient_rl.rewards`).

A reward is a plain function `(completion, sample, **params) -> float | dict`; a dict carries
`score` plus extra per-sample metrics (e.g. `accuracy`).
"""
