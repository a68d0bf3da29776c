"""``looptrace eval``: the retraining harness behind docs/results/eval (LDS, removal, step counterfactuals)."""
