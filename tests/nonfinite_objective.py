"""A recipe plugin for tests/test_nonfinite.py: the policy-gradient objective with a loss that is
never finite (as a reward or an objective gone wrong would make it), selected by
algorithm.objective: nonfinite_policy_gradient."""

import math

from efficient_rl.learner.objective import OBJECTIVES, policy_gradient


@OBJECTIVES.register("nonfinite_policy_gradient", needs=("old_logprobs",), source="tests/test_nonfinite.py")
def nonfinite_policy_gradient(model, rows, settings, den, teacher):
    loss, stats = policy_gradient(model, rows, settings, den, teacher)
    return loss * math.inf, stats  # inf, or NaN where the loss is 0: either way its gradients are not finite
