"""MixLoraConfig: the configuration of a Conditional Mixture-of-LoRA adapter (a PEFT config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._peft_registration import MIXLORA_PEFT_TYPE

ROUTINGS = ("ifs", "ifs+cfs", "random", "task")
POOLINGS = ("prompt", "all", "reference")
ROUTER_GRADS = ("none", "scores", "straight_through")
CFS_MODES = ("paper", "reference")
PAIRINGS = ("score", "index")


@dataclass
class MixLoraConfig(PeftConfig):
    """Configuration of a MixLoRA adapter (Shen et al., ACL 2024).

    Each adapted linear layer owns two pools of `num_factors` rank-1 factors. For every input instance the
    layer selects `r` A factors (Independent Factor Selection) and `r` B factors (IFS, optionally refined by
    Conditional Factor Selection on the selected A factors) and adds `lora_alpha / r * B_x A_x x` to the frozen
    layer's output. See `shared/method.md` of the project for the full specification.
    """

    num_factors: int = field(default=16, metadata={"help": "E: the number of rank-1 factors in each pool (A and B)."})
    r: int = field(default=4, metadata={"help": "Factors selected per instance from each pool (the update's rank)."})
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "Scale numerator: the update is multiplied by lora_alpha / r. None means 2 * num_factors "
                          "(the reference code's choice)."},
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the adapter branch input only (never on the router input)."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module name suffixes, or one regex matched against full names, to adapt. None picks the "
                          "language model's q,k,v,o,gate,up,down projections for known model types."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffixes, or one regex) never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt layers with these indices (as in PEFT's LoRA)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the ModuleList holding the layers, for layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Non-adapter modules trained in full and saved, e.g. a VLM's projector."}
    )
    mix_start_layer: int = field(
        default=0, metadata={"help": "Layers with index below this get a plain rank-r LoRA instead of MixLoRA."}
    )
    routing: Literal["ifs", "ifs+cfs", "random", "task"] = field(
        default="ifs+cfs",
        metadata={"help": "Factor selection: 'ifs', 'ifs+cfs', 'random' (fresh random indices per instance and "
                          "forward; a baseline) or 'task' (one selection per task id passed as mixlora_task_ids=...)."},
    )
    pooling: Literal["prompt", "all", "reference"] = field(
        default="prompt",
        metadata={"help": "Instance representation: 'prompt' (mean over non-padding positions whose label is "
                          "-100), 'all' (mean over non-padding positions), 'reference' (unmasked mean, padding "
                          "included, as in the reference code)."},
    )
    router_grad: Literal["none", "scores", "straight_through"] = field(
        default="none",
        metadata={"help": "'none': routers get no gradient and are stored as buffers (reference behaviour); "
                          "'scores': selected factor pairs are scaled by r times their renormalised top-r "
                          "probabilities; 'straight_through': unscaled forward, and the routers alone "
                          "get the coefficients' gradient, taken at that forward (the routing inputs are detached)."},
    )
    router_aux_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of a Switch-style load-balancing loss over factor usage, added to the model's "
                          "loss in training. Needs router_grad != 'none'."},
    )
    router_noise: float = field(
        default=0.0, metadata={"help": "Std of Gaussian noise added to router logits in training mode."}
    )
    cfs: Literal["paper", "reference"] = field(
        default="paper",
        metadata={"help": "Conditional Factor Selection arithmetic: 'paper' (sum_i softmax(a_i . W_AB[i])) or "
                          "'reference' (the reference code's separated sums and second softmax)."},
    )
    cfs_weight: float = field(default=1.0, metadata={"help": "Weight of the CFS scores added to the B router's."})
    pairing: Literal["score", "index"] = field(
        default="score",
        metadata={"help": "How the r selected A factors are matched with the r selected B factors: 'score' (the "
                          "paper's: the i-th of each pool by router score) or 'index' (the i-th of each in factor "
                          "order, so that the update depends on which factors are selected, not on their order)."},
    )
    num_tasks: int | None = field(
        default=None, metadata={"help": "Number of task ids, required by routing='task'."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Initialise B factors to zero (training starts at the base model). False draws them "
                          "like the A factors, which is useful for tests only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MIXLORA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.lora_alpha is None:
            self.lora_alpha = float(2 * self.num_factors)
        self._validate()

    def _validate(self) -> None:
        def check_choice(name: str, choices: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"MixLoraConfig.{name} must be one of {choices}, got {value!r}.")

        for name, choices in (("routing", ROUTINGS), ("pooling", POOLINGS), ("router_grad", ROUTER_GRADS),
                              ("cfs", CFS_MODES), ("pairing", PAIRINGS)):
            check_choice(name, choices)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"MixLoraConfig.r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.num_factors, int) or self.num_factors < 1:
            raise ValueError(f"MixLoraConfig.num_factors must be a positive integer, got {self.num_factors!r}.")
        if self.r > self.num_factors:
            raise ValueError(
                f"MixLoraConfig.r ({self.r}) cannot exceed num_factors ({self.num_factors}): r factors are "
                "selected out of a pool of num_factors."
            )
        if self.lora_alpha <= 0:
            raise ValueError(f"MixLoraConfig.lora_alpha must be positive, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MixLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.mix_start_layer < 0:
            raise ValueError(f"MixLoraConfig.mix_start_layer must be >= 0, got {self.mix_start_layer!r}.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"MixLoraConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}.")
        if self.router_aux_loss_coef > 0 and self.router_grad == "none":
            raise ValueError(
                "MixLoraConfig.router_aux_loss_coef > 0 needs a router that learns: set router_grad to 'scores' "
                "or 'straight_through' (with router_grad='none' no gradient reaches the routers)."
            )
        if self.router_aux_loss_coef > 0 and self.routing == "random":
            raise ValueError("MixLoraConfig.router_aux_loss_coef > 0 has no router to balance with routing='random'.")
        if self.router_noise < 0:
            raise ValueError(f"MixLoraConfig.router_noise must be >= 0, got {self.router_noise!r}.")
        if self.cfs_weight < 0:
            raise ValueError(f"MixLoraConfig.cfs_weight must be >= 0, got {self.cfs_weight!r}.")
        if self.routing == "task":
            if self.num_tasks is None or self.num_tasks < 1:
                raise ValueError("MixLoraConfig.routing='task' needs num_tasks (the number of distinct task ids).")
        if self.router_grad != "none" and self.routing == "random":
            raise ValueError("MixLoraConfig.routing='random' has no router to train: use router_grad='none'.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("MixLoraConfig.layers_pattern is only used together with layers_to_transform.")
