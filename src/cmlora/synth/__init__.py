"""A synthetic multimodal instruction-tuning suite for tiny LLaVA-style models (`cmlora synth`).

Scenes of shapes, letters and real handwritten digits drawn with Pillow (`scenes`), 34 training tasks in the
paper's six categories (`train_tasks`), unseen evaluation tasks in the formats of the seven datasets and MME
(`eval_tasks`), and `write_suite`, which writes all of it plus the base's pretraining data (`suite`).
"""

from .suite import write_suite

__all__ = ["write_suite"]
