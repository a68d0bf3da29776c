"""``looptrace eval``: the retraining harness behind docs/results/eval (LDS, removal, step counterfactuals).

The task modules below register their tasks in :data:`looptrace.apps.evaluation.task.TASKS` when imported;
importing this package imports them, so the table is complete wherever it is read (task.py cannot import them:
they subclass its tasks)."""

from looptrace.apps.evaluation import sampled_depth as sampled_depth
from looptrace.apps.evaluation import tasks_attention as tasks_attention
