"""The parity case study: registered as ``parity``."""

from looptrace.apps.registry import CaseStudy, register_study
from looptrace.apps.studies.parity.study import ParityStudyConfig, run_parity_study
from looptrace.apps.studies.parity.task import PRESETS, ParityTask, influence_sets

STUDY = register_study(
    CaseStudy(
        name="parity",
        summary="parity of n bits (Fan et al.): a finite-state circuit found with SDI (the paper's Fig. 1)",
        task_type=ParityTask,
        presets=PRESETS,
        influence_sets=influence_sets,
        study_config=ParityStudyConfig,
        quick_config=ParityStudyConfig.quick,
        run_study=run_parity_study,
    )
)
