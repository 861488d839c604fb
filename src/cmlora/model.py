"""MixLoraModel: the PEFT tuner that injects MixLoRA layers and feeds them each model call's routing inputs."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ._peft_registration import PREFIX
from .config import MixLoraConfig
from .context import SEGMENT_IDS_KWARG, TASK_IDS_KWARG, RoutingContext, RoutingTrace
from .layer import MERGE_ERROR, Linear, MixLoraLayer

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A VLM's language model, by the name of its module: `language_model` (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
# PaliGemma) or `text_model` (Idefics3, SmolVLM).
_LANGUAGE_MODEL = r"(?:^|\.)(?:language_model|text_model)\."
LANGUAGE_MODEL_MODULE = re.compile(_LANGUAGE_MODEL)
# VLMs: the language model's projections only. Plain suffixes would also hit the vision tower (CLIP has q_proj,
# k_proj, v_proj; Qwen2.5-VL's vision MLP has gate/up/down_proj; Idefics3's SigLIP q_proj, k_proj, v_proj).
LANGUAGE_MODEL_PROJECTIONS = r".*" + _LANGUAGE_MODEL + r".*\.(" + "|".join(_PROJECTIONS) + r")$"
DEFAULT_TARGET_MODULES: dict[str, Any] = {
    **{name: _PROJECTIONS for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite")},
    **{name: LANGUAGE_MODEL_PROJECTIONS
       for name in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "smolvlm")},
}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_CONTEXT_ATTR = "_mixlora_routing_context"
_HOOKS_ATTR = "_mixlora_hook_handles"


def layer_index(module_name: str) -> int | None:
    """The transformer-block index in a module path such as 'model.layers.3.self_attn.q_proj', or None."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def call_cache(arguments: dict[str, Any]) -> object:
    """The KV cache a model call was given. transformers 5.24 renamed the forward argument `past_key_values` to
    `cache` (generate passes `cache`; the old name is still accepted, through **kwargs, until 5.40)."""
    for name in ("cache", "past_key_values"):
        if arguments.get(name) is not None:
            return arguments[name]
    return None


class MixLoraModel(BaseTuner):
    """Creates a MixLoRA model from a transformers (or any torch) model; use it through `peft.get_peft_model`.

    Besides injecting layers, it registers a forward pre-hook on the wrapped model that hands each call's
    `attention_mask`, `labels`, KV cache (`call_cache`), `mixlora_task_ids` and `mixlora_segment_ids` (packed rows;
    both popped, so the model never sees them) to the layers, and a forward hook that adds the router
    load-balancing loss to the output's loss when configured.
    """

    prefix: str = PREFIX
    tuner_layer_cls = MixLoraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # ----------------------------------------------------------------- injection
    @property
    def routing_context(self) -> RoutingContext:
        # Created lazily in __dict__: layers are injected inside BaseTuner.__init__, and nn.Module attributes
        # cannot be set before it runs.
        if _CONTEXT_ATTR not in self.__dict__:
            self.__dict__[_CONTEXT_ATTR] = RoutingContext()
        return self.__dict__[_CONTEXT_ATTR]

    def _prepare_adapter_config(self, peft_config: MixLoraConfig, model_config: dict) -> MixLoraConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in DEFAULT_TARGET_MODULES:
                raise ValueError(
                    f"MixLoraConfig.target_modules is not set and there is no default for model type {model_type!r}"
                    f"; known types: {sorted(DEFAULT_TARGET_MODULES)}. Pass target_modules, e.g. ['q_proj', 'v_proj']."
                )
            targets = DEFAULT_TARGET_MODULES[model_type]
            peft_config.target_modules = targets if isinstance(targets, str) else set(targets)
        return peft_config

    def _create_and_replace(self, peft_config: MixLoraConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if current_key is None:
            raise ValueError("MixLoraModel._create_and_replace needs current_key")
        index = layer_index(current_key)
        plain = peft_config.mix_start_layer > 0 and index is not None and index < peft_config.mix_start_layer
        if isinstance(target, MixLoraLayer):
            target.update_layer(adapter_name, peft_config, plain)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"MixLoRA adapts torch.nn.Linear layers only; {current_key!r} is a {type(base).__name__}. "
                "Narrow target_modules to linear layers."
            )
        new_module = Linear(target, adapter_name, peft_config, plain=plain)
        new_module.mixlora_layer_name = current_key
        new_module.mixlora_context = self.routing_context
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._install_hooks(model)

    def _install_hooks(self, model: nn.Module) -> None:
        if self.__dict__.get(_HOOKS_ATTR):
            return
        signature = inspect.signature(model.forward)
        var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        context = self.routing_context

        def before_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            task_ids = kwargs.pop(TASK_IDS_KWARG, None)
            segment_ids = kwargs.pop(SEGMENT_IDS_KWARG, None)
            try:
                bound = dict(signature.bind_partial(*args, **kwargs).arguments)
                bound = {**bound.pop(var_keyword, {}), **bound}  # a name the signature takes through **kwargs
            except TypeError:
                bound = kwargs
            context.begin_call(
                attention_mask=bound.get("attention_mask"),
                labels=bound.get("labels"),
                task_ids=task_ids,
                past_key_values=call_cache(bound),
                segment_ids=segment_ids,
            )
            return args, kwargs

        def after_call(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            aux = self._router_aux_loss()
            self.__dict__["router_aux_loss"] = aux
            loss = getattr(output, "loss", None)
            if aux is not None and loss is not None:
                output.loss = loss + aux.to(loss.dtype)
            return output

        self.__dict__[_HOOKS_ATTR] = [
            model.register_forward_pre_hook(before_call, with_kwargs=True),
            model.register_forward_hook(after_call, with_kwargs=True),
        ]
        if callable(getattr(model, "generate", None)):
            self._wrap_generate(model)

    def _wrap_generate(self, model: nn.Module) -> None:
        """Let `generate` take `mixlora_task_ids=` (routing='task') and hand it to every forward call it makes.

        transformers' generate rejects keyword arguments its model's forward does not declare, so the task ids are
        taken out before generate sees it. The wrapper is an instance attribute, removed again by unload().
        """
        original = model.generate
        context = self.routing_context

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            with context.generation_task_ids(kwargs.pop(TASK_IDS_KWARG, None)):
                return original(*args, **kwargs)

        generate.__mixlora_wrapper__ = True
        model.generate = generate

    def _remove_hooks(self) -> None:
        for handle in self.__dict__.pop(_HOOKS_ATTR, []):
            handle.remove()
        if getattr(self.model.__dict__.get("generate"), "__mixlora_wrapper__", False):
            del self.model.generate

    def _router_aux_loss(self) -> torch.Tensor | None:
        """coef * (mean over layers of the load-balancing loss), summed over adapters; None if not configured."""
        per_adapter: dict[str, list[torch.Tensor]] = {}
        for (_, adapter), loss in self.routing_context.aux_losses.items():
            per_adapter.setdefault(adapter, []).append(loss)
        if not per_adapter:
            return None
        return sum(self.peft_config[a].router_aux_loss_coef * torch.stack(v).mean() for a, v in per_adapter.items())

    # ----------------------------------------------------------------- analysis
    @contextlib.contextmanager
    def trace_routing(self) -> Iterator[RoutingTrace]:
        """Record, per adapted layer and instance, the selected A and B factor indices of every model call.

        Decode steps that continue a KV cache reuse the prefill's routing and add no records.
        """
        with self.routing_context.tracing() as trace:
            yield trace

    # ----------------------------------------------------------------- merging and unloading
    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(MERGE_ERROR)

    def unload(self) -> nn.Module:
        self._remove_hooks()
        return super().unload()
