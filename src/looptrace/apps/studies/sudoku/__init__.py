"""The Sudoku case study: registered as ``sudoku``."""

from looptrace.apps.registry import CaseStudy, register_study
from looptrace.apps.studies.sudoku.study import SudokuStudyConfig, aggregate_seeds, run_sudoku_study
from looptrace.apps.studies.sudoku.task import PRESETS, SudokuTask, influence_sets

STUDY = register_study(
    CaseStudy(
        name="sudoku",
        summary="Sudoku (Yang et al.): loop-compute scaling, SDI energy, memorisation vs difficulty (Fig. 2, Table 1)",
        task_type=SudokuTask,
        presets=PRESETS,
        influence_sets=influence_sets,
        study_config=SudokuStudyConfig,
        quick_config=SudokuStudyConfig.quick,
        run_study=run_sudoku_study,
        aggregate=aggregate_seeds,
    )
)
