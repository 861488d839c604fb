"""Import adapters trained with the reference code (VT-NLP/MixLoRA, a LLaVA-v1 fork).

The reference saves the whole model as a pickled `pytorch_model.bin`. Load it with
`torch.load(path, map_location="cpu", weights_only=True)` (never unpickle untrusted files with code execution),
then copy the adapter part into a cmlora model built with `config_from_reference_args(...)`:

    state_dict = torch.load("pytorch_model.bin", map_location="cpu", weights_only=True)
    model = get_peft_model(llava, config_from_reference_args(cmoa_args, target_modules=...))
    load_reference_adapter(model, state_dict)

Layout per adapted linear layer (method.md section 7), under `...layers.N.{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj}.`: `lora_A.default.{e}` [1, d_in] and `lora_B.default.{e}` [1, d_out] for e < E;
`cmoa_selector.loraA_selector.weight` [E, d_in]; with IFS alone `cmoa_selector.loraB_selector.weight`; with
CFS `cmoa_loarB_extra_selector.loraB_selector.weight` [E, d_in] and
`cmoa_loarB_extra_selector.loraA_param2loraB_selector.weight` [E, r*d_in] (the reference's own spelling).
Layers below `mix_start_layer` hold a plain LoRA: `lora_A.default.0` [r, d_in], `lora_B.default.0` [r, d_out].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import MixLoraConfig
from ..layer import MixLoraLayer

_MODULE_SUFFIX = re.compile(r"(?:^|\.)(layers\.\d+\.(?:self_attn|mlp)\.[a-z_]+_proj)\.")
_COND_TYPE_TO_ROUTING = {"input": "ifs", "input_lora_a_param": "ifs+cfs"}


def config_from_reference_args(args: Mapping[str, Any], **overrides: Any) -> MixLoraConfig:
    """A MixLoraConfig that computes what the reference code computes, from its `cmoa_args` values.

    Reproduction needs the reference's pooling (unmasked mean) and CFS arithmetic, and routers that never
    train; `overrides` (e.g. target_modules) are passed through to MixLoraConfig.
    """
    cond_type = args.get("cond_type", "input_lora_a_param")
    if cond_type not in _COND_TYPE_TO_ROUTING:
        raise ValueError(
            f"reference cond_type {cond_type!r} is not supported; supported: {sorted(_COND_TYPE_TO_ROUTING)}"
        )
    values = dict(
        num_factors=int(args["n_experts"]),
        r=int(args.get("n_selected", args.get("r"))),
        lora_alpha=float(args["lora_alpha"]),
        lora_dropout=float(args.get("lora_dropout", 0.0)),
        mix_start_layer=int(args.get("mix_start_layer", 0)),
        routing=_COND_TYPE_TO_ROUTING[cond_type],
        cfs_weight=float(args.get("ifs_weight", 1.0)),  # the reference's `ifs_weight` weights the CFS term
        pooling="reference",
        cfs="reference",
        router_grad="none",
    )
    values.update(overrides)
    return MixLoraConfig(**values)


def _module_suffix(name: str) -> str | None:
    match = _MODULE_SUFFIX.search(name + ".")
    return match.group(1) if match else None


def _group_by_module(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Reference adapter entries grouped by `layers.N.<block>.<proj>`, keyed by the rest of their name."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if "lora_" not in key and "cmoa_" not in key:
            continue
        match = _MODULE_SUFFIX.search(key)
        if match is None:
            continue
        groups.setdefault(match.group(1), {})[key[match.end():]] = value
    return groups


def _take(entries: dict[str, torch.Tensor], module: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in entries:
        raise ValueError(
            f"reference state dict has no '{module}.{key}' (expected shape {list(shape)}). Check that the "
            "MixLoraConfig (num_factors, r, routing, target_modules, mix_start_layer) matches the reference run."
        )
    value = entries[key]
    if tuple(value.shape) != shape:
        raise ValueError(
            f"reference '{module}.{key}' has shape {list(value.shape)}, expected {list(shape)}; the MixLoraConfig "
            "does not match the reference run (num_factors, r, or the model's dimensions)."
        )
    return value


def _stack_factors(entries: dict[str, torch.Tensor], module: str, pool: str, count: int, dim: int) -> torch.Tensor:
    return torch.cat([_take(entries, module, f"lora_{pool}.default.{e}", (1, dim)) for e in range(count)])


@torch.no_grad()
def _load_layer(layer: MixLoraLayer, adapter: str, entries: dict[str, torch.Tensor], module: str) -> None:
    settings = layer.mixlora_settings[adapter]
    d_in, d_out, r, E = layer.in_features, layer.out_features, settings.r, settings.num_factors
    factors_a, factors_b = layer.mixlora_factors_a[adapter], layer.mixlora_factors_b[adapter]
    if settings.plain:
        factors_a.copy_(_take(entries, module, "lora_A.default.0", (r, d_in)))
        factors_b.copy_(_take(entries, module, "lora_B.default.0", (r, d_out)))
        return
    factors_a.copy_(_stack_factors(entries, module, "A", E, d_in))
    factors_b.copy_(_stack_factors(entries, module, "B", E, d_out))
    if settings.routing not in ("ifs", "ifs+cfs"):
        raise ValueError(f"reference checkpoints use routing 'ifs' or 'ifs+cfs', the model uses {settings.routing!r}")
    router = layer.mixlora_router[adapter]
    router.weight_ifs[0].copy_(_take(entries, module, "cmoa_selector.loraA_selector.weight", (E, d_in)))
    if settings.routing == "ifs":
        router.weight_ifs[1].copy_(_take(entries, module, "cmoa_selector.loraB_selector.weight", (E, d_in)))
        return
    extra = "cmoa_loarB_extra_selector."
    router.weight_ifs[1].copy_(_take(entries, module, extra + "loraB_selector.weight", (E, d_in)))
    cfs = _take(entries, module, extra + "loraA_param2loraB_selector.weight", (E, r * d_in))
    # The reference reshapes its Linear(r*d_in, E) weight 'E (r d) -> r d E'.
    router.weight_cfs.copy_(cfs.reshape(E, r, d_in).permute(1, 2, 0))


def load_reference_adapter(
    peft_model: nn.Module, reference_state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> int:
    """Copy factor pools and routers from a reference-code state dict into `peft_model`'s MixLoRA layers.

    Modules are matched by their `layers.N.<block>.<proj>` suffix, so prefixes (`base_model.model.`,
    `model.language_model.`) do not matter. Every adapted layer must find its entries, and every reference
    adapter module must find a layer: anything else raises a ValueError naming the module. Returns the number
    of layers loaded.
    """
    groups = _group_by_module(reference_state_dict)
    if not groups:
        raise ValueError("the reference state dict holds no MixLoRA entries (no '...lora_A.default.N' keys).")
    loaded: set[str] = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, MixLoraLayer) or adapter_name not in module.mixlora_settings:
            continue
        suffix = _module_suffix(name)
        if suffix is None or suffix not in groups:
            raise ValueError(f"no reference entries for adapted layer {name!r} (looked for '{suffix}.*').")
        _load_layer(module, adapter_name, groups[suffix], suffix)
        loaded.add(suffix)
    unused = sorted(set(groups) - loaded)
    if unused:
        raise ValueError(
            f"{len(unused)} reference adapter module(s) have no MixLoRA layer in the model, e.g. {unused[:3]}; "
            "set target_modules to the reference run's modules."
        )
    return len(loaded)
