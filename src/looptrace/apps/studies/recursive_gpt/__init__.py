"""The recursive-LM case study: registered as ``recursive-gpt``."""

from looptrace.apps.registry import CaseStudy, register_study
from looptrace.apps.studies.recursive_gpt.study import RecursiveStudyConfig, run_recursive_study
from looptrace.apps.studies.recursive_gpt.task import PRESETS, RecursiveGPTTask, influence_sets, train_two_stages

STUDY = register_study(
    CaseStudy(
        name="recursive-gpt",
        summary="a nanochat-style recursive LM: where influence lands in the recurrence (Fig. 3)",
        task_type=RecursiveGPTTask,
        presets=PRESETS,
        influence_sets=influence_sets,
        study_config=RecursiveStudyConfig,
        quick_config=RecursiveStudyConfig.quick,
        run_study=run_recursive_study,
        train=train_two_stages,
    )
)
