"""Architecture studies: every model x seed trained the same way on the same data, one report (classification,
or task 'inference': per-lens posteriors of named targets).

``run_study(StudySettings(...)) -> StudyResult``; ``jobs/study.py`` is the command line. See docs/study.md.
"""

from __future__ import annotations

from deeplense_ray.study.runner import StudyIncomplete, StudyResult, StudySetupError, run_study
from deeplense_ray.study.settings import PROTOCOLS, StudySettings, load_model_config, parse_models

__all__ = [
    "PROTOCOLS",
    "StudyIncomplete",
    "StudyResult",
    "StudySettings",
    "StudySetupError",
    "load_model_config",
    "parse_models",
    "run_study",
]
