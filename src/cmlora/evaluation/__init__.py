"""Zero-shot evaluation: readers for MME and the reference `<task>.jsonl` files, batched resumable generation,
the official MME scoring and the other datasets' scorers, and the paper's summary table."""

from .generate import GenerationSettings, PredictionsMismatchError, predict
from .inputs import EvalDataError, EvalExample, read_mme, read_task_dir, read_task_file
from .mme import MMERow, score_mme
from .runner import compare, evaluate
from .scoring import score_task
from .tasks import TASKS, TaskSpec, spec_for

__all__ = [
    "EvalDataError", "EvalExample", "GenerationSettings", "MMERow", "PredictionsMismatchError", "TASKS", "TaskSpec",
    "compare", "evaluate", "predict", "read_mme", "read_task_dir", "read_task_file", "score_mme", "score_task",
    "spec_for",
]
