"""Per-task generation settings and scorers, in one place.

`kind` names the scoring rule (cmlora.evaluation.scoring / mme); `max_new_tokens` bounds greedy decoding;
`suffix` is appended to the data's prompt to ask for the answer format. The reference evaluation files already
phrase their prompts as instructions (Vision-Flan style), so the seven datasets get no suffix; MME's questions
("Is there a dog in this image?") get LLaVA-1.5's short-answer instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "mme", "vqa", "true_false", "entailment", "label", "yes_no"
    max_new_tokens: int
    suffix: str = ""


TASKS: dict[str, TaskSpec] = {
    "mme": TaskSpec("mme", 8, SHORT_ANSWER),
    "text_vqa": TaskSpec("vqa", 16),
    "vsr": TaskSpec("true_false", 8),
    "snli_ve": TaskSpec("entailment", 8),
    "cifar10": TaskSpec("label", 12),
    "cifar100": TaskSpec("label", 12),
    "mnist": TaskSpec("label", 8),
    "pope": TaskSpec("yes_no", 8),
}
# Tasks of other names (e.g. the synthetic suite's) are scored as short answers by exact match after normalisation.
DEFAULT_TASK = TaskSpec("vqa", 16)
# The paper's "mean of the 7": these datasets, POPE counted once as the mean accuracy of its three splits.
SEVEN = ("text_vqa", "vsr", "snli_ve", "cifar10", "cifar100", "mnist", "pope")


def task_family(task: str) -> str:
    """'pope_random' -> 'pope'; other task names are their own family."""
    return "pope" if task.startswith("pope_") else task


def spec_for(task: str) -> TaskSpec:
    return TASKS.get(task_family(task), DEFAULT_TASK)
