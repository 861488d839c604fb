"""The training recipe: instruction-tune a VLM with MixLoRA, PEFT LoRA or in full, on Hugging Face Trainer.

One YAML file (configs/*.yaml) maps one-to-one onto `TrainConfig`; `cmlora train --config F [--key value ...]`
overrides single fields. A run directory holds:

    config.yaml             the resolved configuration (every field)
    adapter/                the adapter in PEFT format (lora, mixlora); it also holds the projector (and, with
                            `train_output_head`, the output layer), which PEFT saves as `modules_to_save` weights
                            in adapter_model.safetensors
    model/                  the whole model (adapter: full)
    metrics.json            final training metrics, the skip report, the router statistics
    log_history.jsonl       every logged step
    checkpoints/            Trainer checkpoints, for `--resume`

`load_run(run_dir)` returns the ready model and processor. Distributed runs go through torchrun
(`torchrun --nproc_per_node N -m cmlora train ...`) or DeepSpeed (`deepspeed: configs/deepspeed/zero2.json`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import vlm
from .config import MixLoraConfig
from .context import SEGMENT_IDS_KWARG, TASK_IDS_KWARG
from .data.sampling import TaskWeightedSampler, check_task_weights, expected_draws
from .layer import MixLoraLayer

ADAPTERS = ("mixlora", "lora", "full")
# Models whose forward takes packed rows (InstructionCollator's pack_width): image features filled into the image
# tokens in order, and positions that restart per record: one per token (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM), or
# Qwen2-VL's and Qwen2.5-VL's 3-D M-RoPE positions, computed per record by vlm.packed_rope_index after the text
# positions transformers reads the boundaries from. Every supported family today, each tested on its tiny model; a
# family added to vlm.SUPPORTED_MODEL_TYPES stays refused here until its packed rows are tested too.
PACKABLE_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults: the paper's LLaVA-7B recipe (method.md section 4)."""

    model: str = field(default="", metadata={"help": "Base VLM: a hub id or a local folder (cmlora.vlm.load)."})
    data: str = field(default="", metadata={"help": "Training records: Vision-Flan / LLaVA JSON or JSONL."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' image paths are in."})
    output_dir: str = field(default="runs/run", metadata={"help": "The run directory."})
    adapter: str = field(default="mixlora", metadata={"help": "mixlora, lora (PEFT LoRA) or full."})
    template: str = field(default="auto", metadata={
        "help": "Conversation template: vicuna_v1, chat, or auto (vicuna_v1 for LLaVA, else chat)."})
    max_length: int = field(default=1792, metadata={"help": "Truncate examples to this many tokens."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip and count bad records, not fail."})
    keep_encoded: bool = field(default=False, metadata={
        "help": "Keep every encoded record (image pixels included) in memory after the first epoch's check, so "
                "later epochs skip image loading and tokenizing; for datasets that fit in memory."})
    replay_data: str | list[str] | None = field(default=None, metadata={
        "help": "Records mixed into the training set against forgetting, e.g. the base's pretraining conversations "
                "(a file or a list of files, read as one pool; same formats as data; images resolved against "
                "image_folder)."})
    replay_fraction: float = field(default=0.1, metadata={
        "help": "How many replay_data records to mix in, as a share of the training records (drawn once, with seed)."})
    replay_single_turns: bool = field(default=False, metadata={
        "help": "Replay each question/answer pair of replay_data as a record of its own, right after its image "
                "(short records: long replayed conversations pad every random batch they fall in)."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch records of similar token length together (transformers' LengthGroupedSampler): less "
                "padding where lengths vary, e.g. short tasks mixed with long replay conversations."})
    task_weights: dict[str, float] | None = field(default=None, metadata={
        "help": "Sampling weight per task_name, e.g. {digit_sum: 3}: each record of a task of weight w is drawn w "
                "times as often as a record of weight 1 (tasks not named, replay records' task 'pretrain' "
                "included, weigh 1). An epoch keeps its length, so the steps and the schedule stay the unweighted "
                "run's and only the mix moves (cmlora.data.sampling). Not with group_by_length."})
    pack_sequences: bool = field(default=False, metadata={
        "help": "Pack each batch's records into rows of up to max_length tokens, attention kept within each record "
                "(position ids restart per record): the padded batch's loss and gradients for fewer tokens computed, "
                "where lengths vary. Every supported family (vlm.SUPPORTED_MODEL_TYPES); every adapter (MixLoRA "
                "routes each packed record as one instance; not with pooling 'reference')."})
    # adapter
    r: int = field(default=4, metadata={"help": "Rank (LoRA) / factors selected per instance (MixLoRA)."})
    num_factors: int = field(default=16, metadata={"help": "MixLoRA: factors per pool (E)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "Scale numerator; None: 2E (MixLoRA), 2r (LoRA)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter branch input."})
    routing: str = field(default="ifs+cfs", metadata={"help": "MixLoRA routing (see MixLoraConfig)."})
    pooling: str = field(default="prompt", metadata={"help": "MixLoRA instance representation."})
    router_grad: str = field(default="none", metadata={"help": "MixLoRA router gradient mode."})
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "MixLoRA load-balancing loss weight."})
    router_noise: float = field(default=0.0, metadata={"help": "MixLoRA router logit noise (training only)."})
    cfs: str = field(default="paper", metadata={"help": "MixLoRA CFS arithmetic: paper or reference."})
    cfs_weight: float = field(default=1.0, metadata={"help": "MixLoRA CFS weight."})
    pairing: str = field(default="score", metadata={"help": "MixLoRA: match the selected A and B factors by score "
                                                            "(the paper's) or by factor index."})
    mix_start_layer: int = field(default=0, metadata={"help": "MixLoRA: plain LoRA below this layer."})
    target_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Adapted modules; None: the language model's q,k,v,o,gate,up,down."})
    train_projector: bool = field(default=True, metadata={"help": "Train the vision-language projector in full."})
    train_output_head: bool = field(default=False, metadata={
        "help": "Also train the language model's output layer (lm_head) in full, saved with the adapter: for a "
                "base whose output embeddings of the answer words are weak (the suite's from-scratch base)."})
    # optimisation
    epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs)."})
    learning_rate: float = field(default=4e-5, metadata={"help": "Peak learning rate."})
    lora_plus_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+ (Hayou et al., 2024): train the adapter's B side (LoRA's lora_B, MixLoRA's factor pool B) "
                "at this multiple of learning_rate, the rest at learning_rate; None: one learning rate."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps spent warming up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=16, metadata={"help": "Examples per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    seed: int = field(default=42, metadata={"help": "Seed of everything random in the run."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    deepspeed: str | None = field(default=None, metadata={"help": "A DeepSpeed JSON config (ZeRO-2 / ZeRO-3)."})
    tensorboard: bool = field(default=False, metadata={"help": "Also log to TensorBoard (run_dir/tensorboard)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even if a GPU is present."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "DataLoader worker processes; also the processes that check (encode) the records before training."})

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if not 0 < self.replay_fraction <= 1:
            raise ValueError(f"replay_fraction must be in (0, 1], got {self.replay_fraction}")
        if isinstance(self.replay_data, list) and not (self.replay_data and all(
                isinstance(path, str) for path in self.replay_data)):
            raise ValueError(f"replay_data must be a file or a non-empty list of files, got {self.replay_data!r}")
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict) or not self.task_weights:
                raise ValueError(f"task_weights must be a non-empty mapping of task_name: weight, got "
                                 f"{self.task_weights!r}")
            check_task_weights(self.task_weights)
            if self.group_by_length:
                raise ValueError("task_weights and group_by_length are two samplers; choose one")
        if self.pack_sequences and self.adapter == "mixlora" and self.pooling == "reference":
            raise ValueError("pack_sequences with MixLoRA pools each packed record over its own positions; "
                             "pooling 'reference' averages a padded row, padding included. Use pooling 'prompt' or "
                             "'all', or pack_sequences: false")
        if self.lora_plus_ratio is not None:
            if not self.lora_plus_ratio > 0:
                raise ValueError(f"lora_plus_ratio must be > 0, got {self.lora_plus_ratio}")
            if self.adapter == "full":
                raise ValueError("lora_plus_ratio needs an adapter with a B side (lora or mixlora), not 'full'")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file plus overrides; unknown keys are an error naming the file and key."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping of field: value")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown config key(s) {unknown}; known keys: {sorted(known)}")
    return TrainConfig(**values)


def resolve_template(name: str, model: nn.Module, processor: Any) -> str:
    """The conversation template `name` stands for: "auto" is the paper's vicuna_v1 for LLaVA (LLaVA-1.5 was tuned
    on Vicuna v1) and the checkpoint's own chat template for the other families (Qwen2-VL: ChatML), which is also
    how they are prompted after training; vicuna_v1 where a processor has no chat template."""
    if name != "auto":
        return name
    if vlm.model_type(model) == "llava" or getattr(processor, "chat_template", None) is None:
        return "vicuna_v1"
    return "chat"


def build_adapter_model(model: nn.Module, config: TrainConfig, num_tasks: int | None = None) -> nn.Module:
    """Wrap `model` with the configured adapter; the vision tower stays frozen, the projector trains.

    `num_tasks` (the size of the data's task vocabulary) is needed by MixLoRA's routing='task' only.
    """
    from peft import LoraConfig, get_peft_model

    defaults = vlm.mixlora_targets(model)
    if config.adapter == "full":  # the output layer trains with the language model
        for name, param in model.named_parameters():
            in_language_model = vlm.in_language_model(name) or "lm_head" in name
            in_projector = any(m in name for m in defaults["modules_to_save"]) and config.train_projector
            param.requires_grad_(in_language_model or in_projector)
        return model
    targets = config.target_modules or defaults["target_modules"]
    modules_to_save = list(defaults["modules_to_save"]) if config.train_projector else []
    if config.train_output_head:
        modules_to_save.append(output_head_name(model))
    modules_to_save = modules_to_save or None
    if config.adapter == "lora":
        adapter_config = LoraConfig(r=config.r, lora_alpha=config.lora_alpha or 2 * config.r,
                                    lora_dropout=config.lora_dropout, target_modules=targets,
                                    modules_to_save=modules_to_save)
    else:
        adapter_config = MixLoraConfig(
            num_factors=config.num_factors, r=config.r, lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout, target_modules=targets, modules_to_save=modules_to_save,
            mix_start_layer=config.mix_start_layer, routing=config.routing, pooling=config.pooling,
            router_grad=config.router_grad, router_aux_loss_coef=config.router_aux_loss_coef,
            router_noise=config.router_noise, cfs=config.cfs, cfs_weight=config.cfs_weight,
            pairing=config.pairing,
            num_tasks=num_tasks if config.routing == "task" else None,
        )
    return get_peft_model(model, adapter_config)


def output_head_name(model: nn.Module) -> str:
    """The name of `model`'s output layer; an error if it shares its weight with the input embeddings (training
    it would train them too, which `train_output_head` does not promise)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"train_output_head: {type(model).__name__} has no output embeddings to train")
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError("train_output_head: the model ties its output layer to its input embeddings; training one "
                         "would train both. Set train_output_head: false, or untie them (tie_word_embeddings=False)")
    return next(name for name, module in model.named_modules() if module is head)


def router_statistics(model: nn.Module) -> dict[str, float]:
    """Factor-usage entropy of the last batch (mean over MixLoRA layers, in [0, 1]) and the aux loss."""
    entropies = []
    for module in model.modules():
        if not isinstance(module, MixLoraLayer) or module.mixlora_context is None:
            continue
        for adapter, settings in module.mixlora_settings.items():
            selection = module.mixlora_context.last_selection(module.mixlora_layer_name, adapter)
            if selection is None or settings.plain:
                continue
            for indices in (selection.index_a, selection.index_b):
                counts = torch.bincount(indices.reshape(-1), minlength=settings.num_factors).float()
                p = counts / counts.sum()
                entropy = -(p[p > 0] * p[p > 0].log()).sum() / math.log(settings.num_factors)
                entropies.append(float(entropy))
    stats = {}
    if entropies:
        stats["router_usage_entropy"] = sum(entropies) / len(entropies)
    for module in model.modules():
        aux = module.__dict__.get("router_aux_loss")
        if aux is not None:
            stats["router_aux_loss"] = float(aux.detach())
    return stats


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by the fully written `tmp` with one rename, so a killed run never leaves half of one."""
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json exists (Trainer writes it last), oldest first."""
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prepare_for_zero3(model: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, fetch each MixLoRA layer's parameters as one unit when the layer runs.

    A layer indexes its factor pools (ParameterDicts that are never called) with instance-dependent indices,
    the access pattern of MoE blocks, for which DeepSpeed recommends marking the block as a ZeRO-3 leaf: its
    parameters (base weight, factors, routers) are then gathered together at the layer's forward, and prefetching
    never depends on which factors were selected. DeepSpeed 0.19.8 also gathered the pools without the marking in
    our CPU runs (tests_deepspeed/); the marking keeps that from resting on an implementation detail.
    """
    from deepspeed.utils import set_z3_leaf_modules

    from .layer import Linear

    set_z3_leaf_modules(model, [Linear])


def _zero_stage(deepspeed_config: str | None) -> int:
    if not deepspeed_config:
        return 0
    return int(json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0))


# Parameter-name parts of an adapter's B side (the up-projection that starts at zero), for LoRA+.
B_SIDE_NAMES = ("lora_B", "lora_embedding_B", "mixlora_factors_b")


def lora_plus_groups(named_parameters: Any, learning_rate: float, ratio: float, weight_decay: float,
                     decay_names: set[str]) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: the B side at `learning_rate * ratio`, every other trainable
    parameter at `learning_rate`; weight decay only on `decay_names`, as Trainer does."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            key = (any(part in name for part in B_SIDE_NAMES), name in decay_names)
            groups.setdefault(key, []).append(param)
    if not any(b_side for b_side, _ in groups):
        raise ValueError(f"lora_plus_ratio: no trainable parameter's name contains any of {B_SIDE_NAMES}")
    return [{"params": params, "lr": learning_rate * ratio if b_side else learning_rate,
             "weight_decay": weight_decay if decayed else 0.0}
            for (b_side, decayed), params in sorted(groups.items())]


def _trainer_class(lora_plus_ratio: float | None = None, task_weights: dict[str, float] | None = None) -> type:
    from transformers import Trainer

    class CmloraTrainer(Trainer):
        """Trainer that adds MixLoRA's router statistics to every log line, gives length-grouped sampling the
        token lengths `InstructionDataset.validate` measured (transformers would encode every record again), with
        `task_weights` draws each epoch by task weight (`TaskWeightedSampler`), and with `lora_plus_ratio` builds
        LoRA+'s two learning rates into the optimizer Trainer would build."""

        def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
            if lora_plus_ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = lora_plus_groups(opt_model.named_parameters(), kwargs.pop("lr", self.args.learning_rate),
                                      lora_plus_ratio, self.args.weight_decay,
                                      set(self.get_decay_parameter_names(opt_model)))
            self.optimizer = optimizer_cls(groups, **kwargs)
            return self.optimizer

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if task_weights is not None:
                return TaskWeightedSampler(record_tasks(dataset), task_weights, seed=self.args.data_seed)
            lengths = getattr(dataset, "lengths", None)
            if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                logs.update(router_statistics(self.model))
            super().log(logs, *args, **kwargs)

    return CmloraTrainer


def _training_arguments(config: TrainConfig, run_dir: Path) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        deepspeed=config.deepspeed,
        report_to=["tensorboard"] if config.tensorboard else [],
        use_cpu=config.use_cpu,
        dataloader_num_workers=config.dataloader_num_workers,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def train(config: TrainConfig, resume: bool = False, callbacks: list[Any] | None = None) -> Path:
    """Run the recipe; returns the run directory.

    `resume` continues from the newest complete checkpoint (one whose trainer_state.json, written last, exists;
    a checkpoint cut short by a killed process is ignored). `callbacks`: extra transformers TrainerCallbacks.
    """
    from transformers import set_seed

    from .data import InstructionCollator, InstructionDataset, load_records

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.tensorboard:  # transformers 5 reads the TensorBoard folder from the environment
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    set_seed(config.seed)
    model, processor = vlm.load(config.model, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    if config.pack_sequences and vlm.model_type(model) not in PACKABLE_MODEL_TYPES:
        raise ValueError(f"pack_sequences: {config.model} is a {vlm.model_type(model)!r} model; packed rows are "
                         f"supported for {list(PACKABLE_MODEL_TYPES)}. Set pack_sequences: false")
    records, skipped = load_records(config.data, config.image_folder, skip_bad_records=config.skip_bad_records)
    if config.replay_data:
        records += replay_records(config, records)
    template = resolve_template(config.template, model, processor)
    print(f"[cmlora] conversation template: {template}")
    dataset = InstructionDataset(records, processor, template=template, max_length=config.max_length,
                                 skip_bad_records=config.skip_bad_records, keep_encoded=config.keep_encoded)
    model = build_adapter_model(model, config, num_tasks=len(dataset.task_names))  # validate keeps the vocabulary
    if _zero_stage(config.deepspeed) == 3:
        prepare_for_zero3(model)
    # The arguments before validate(): building them starts torch.distributed under torchrun or DeepSpeed, so that
    # the processes split the records' check between them.
    training_arguments = _training_arguments(config, run_dir)
    skipped_in_dataset = dataset.validate(workers=config.dataloader_num_workers)
    skip_counts = {**skipped.counts}
    for reason, count in skipped_in_dataset.counts.items():
        skip_counts[reason] = skip_counts.get(reason, 0) + count
    if skip_counts:
        print(f"[cmlora] skipped {sum(skip_counts.values())} bad record(s): {skip_counts}")
    if config.task_weights is not None:
        report_task_weights(config, record_tasks(dataset))
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mixlora = config.adapter == "mixlora"
    collator = InstructionCollator(pad_id, task_ids_key=TASK_IDS_KWARG if mixlora else None,
                                   pack_width=config.max_length if config.pack_sequences else None,
                                   segment_ids_key=SEGMENT_IDS_KWARG if mixlora and config.pack_sequences else None,
                                   rope_index=vlm.packed_rope_index(model) if config.pack_sequences else None)
    trainer = _trainer_class(config.lora_plus_ratio, config.task_weights)(
        model=model, args=training_arguments, train_dataset=dataset, data_collator=collator,
        callbacks=callbacks, processing_class=processor)
    checkpoints = complete_checkpoints(run_dir / "checkpoints") if resume else []
    if resume:
        print(f"[cmlora] resuming from {checkpoints[-1]}" if checkpoints else "[cmlora] no checkpoint to resume")
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    # Every process takes part in saving: under ZeRO-3 the weights are gathered from all ranks first.
    final = run_dir / ("model" if config.adapter == "full" else "adapter")
    staging = final.with_name(f".{final.name}.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        publish_dir(staging, final)
        _write_run_metadata(run_dir, trainer, config, dataset.task_names,
                            {**result.metrics, "skipped_records": skip_counts, **router_statistics(trainer.model)})
    return run_dir


def record_tasks(dataset: Any) -> list[str]:
    """Each kept record's task name, in dataset order ("unknown" for records without one)."""
    from .data.dataset import UNKNOWN_TASK

    return [UNKNOWN_TASK if record.task_name is None else record.task_name for record in dataset.records]


def report_task_weights(config: TrainConfig, tasks: list[str]) -> None:
    """Check `task_weights` against the records' tasks and print each weighted task's records and draws an epoch."""
    check_task_weights(config.task_weights, tasks, where=f"{config.data}: task_weights")
    expected, records = Counter(), Counter(tasks)
    for task, draws in zip(tasks, expected_draws(tasks, config.task_weights), strict=True):
        expected[task] += draws
    shares = ", ".join(f"{task} {records[task]} -> {expected[task]:.0f}" for task in sorted(config.task_weights))
    others = [task for task in records if task not in config.task_weights]
    other = (f"; each other task's records drawn {expected[others[0]] / records[others[0]]:.2f} x an epoch"
             if others else "")
    print(f"[cmlora] task_weights, records -> draws an epoch: {shares}{other}")


def replay_records(config: TrainConfig, records: list[Any]) -> list[Any]:
    """`replay_fraction` x len(records) records of `replay_data` (with `replay_single_turns`, of its question/answer
    pairs, each a record), drawn without replacement with the run's seed (the same on every process of a
    distributed run)."""
    from .data import DataError, load_records
    from .data.records import one_question_each

    paths = [config.replay_data] if isinstance(config.replay_data, str) else config.replay_data
    replay = [record for path in paths for record in load_records(path, config.image_folder)[0]]
    if config.replay_single_turns:
        replay = one_question_each(replay)
    wanted = round(config.replay_fraction * len(records))
    if wanted > len(replay):
        raise DataError(f"{', '.join(paths)}: replay_fraction {config.replay_fraction} asks for {wanted} records "
                        f"({config.replay_fraction} x {len(records)} training records) but there are {len(replay)}",
                        "too few replay records")
    ids = {record.id: record.source for record in records}
    clash = next((record for record in replay if record.id in ids), None)
    if clash is not None:  # record_error's format, without its skip hint: skipping cannot resolve a clash
        raise DataError(f"{clash.source}: record {clash.id!r}: field 'id': also used by the training record at "
                        f"{ids[clash.id]}; ids must be unique across data and replay_data", "duplicate id")
    drawn = random.Random(config.seed).sample(replay, wanted)
    print(f"[cmlora] mixed in {wanted} records of {', '.join(paths)}")
    return drawn


def _write_run_metadata(run_dir: Path, trainer: Any, config: TrainConfig, task_names: list[str],
                        metrics: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    (run_dir / "task_names.json").write_text(json.dumps(task_names, indent=1) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    with open(run_dir / "log_history.jsonl", "w") as handle:
        for entry in trainer.state.log_history:
            handle.write(json.dumps(entry) + "\n")


def load_run(run_dir: str | Path, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, Any]:
    """The trained model of a run (base + adapter + trained projector), in eval mode, and its processor."""
    from peft import PeftModel

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: not a cmlora run directory (no config.yaml); train one with cmlora train")
    config = load_config(run / "config.yaml")
    if config.adapter == "full":
        model, processor = vlm.load(run / "model", dtype=dtype)
    else:
        model, processor = vlm.load(config.model, dtype=dtype)
        model = PeftModel.from_pretrained(model, run / "adapter")
    return model.eval(), processor
