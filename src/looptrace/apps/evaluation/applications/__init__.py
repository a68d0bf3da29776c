"""``looptrace eval applications``: the paper's three applications (its section 1), each checked against what
looping or retraining actually does (issue #27).

* :mod:`.horizon` -- (i) the influence horizon as a test-time compute rule, on models trained with sampled
  depth (the sampled-depth evaluation task, :mod:`looptrace.apps.evaluation.sampled_depth`, and the Sudoku
  case study's runs, :mod:`.sudoku`);
* :mod:`.cancellation` -- (ii) signal cancellation, by the per-step counterfactual and by retraining;
* :mod:`.curation` -- (iii) depth-targeted curation over seeds, and adding the examples back;
* :mod:`.verdicts` -- every verdict word, from the numbers; :mod:`.report` -- figures and the HTML report;
  :mod:`.run` -- the command (:func:`run_applications`).

The analyses themselves are library functions on arrays (:mod:`looptrace.analysis.applications`).
"""

from looptrace.apps.evaluation.applications.run import ApplicationsConfig, run_applications

__all__ = ["ApplicationsConfig", "run_applications"]
