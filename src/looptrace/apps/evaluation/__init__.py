"""``looptrace eval``: the retraining harness behind docs/results/eval (LDS, removal, step counterfactuals)."""

# Task modules register themselves in ``task.TASKS`` when imported; importing them here means any import of the
# evaluation package sees every task (task.py cannot import them: they subclass its tasks).
from looptrace.apps.evaluation import sampled_depth as _sampled_depth  # noqa: F401
