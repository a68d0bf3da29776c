"""Counterfactual evaluation of attribution scores: plain functions a researcher can reuse on their own
retraining results (:func:`lds`, :func:`removal_effect`, :func:`spearman`, :func:`bootstrap_ci`), and
the per-loop-step counterfactual (:func:`step_counterfactual`). The retraining harness that produces the
committed results is ``looptrace eval`` (:mod:`looptrace.apps.evaluation`)."""

from looptrace.evaluation.counterfactual import step_counterfactual, untied_step
from looptrace.evaluation.metrics import bootstrap_ci, lds, rank, removal_effect, spearman

__all__ = ["bootstrap_ci", "lds", "rank", "removal_effect", "spearman", "step_counterfactual", "untied_step"]
