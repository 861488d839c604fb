"""The MixLoRA linear layer: h = W x + s * B_x A_x x with instance-specific factors (method.md section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MixLoraConfig
from .context import PackedSegments, RoutingContext
from .routing import Selection, load_balancing_loss, pool, route

MERGE_ERROR = (
    "MixLoRA adapters cannot be merged into the base weights: every instance selects its own factors, so the "
    "update B_x A_x depends on the input and there is no single matrix to add to W. Keep the adapter attached "
    "(PeftModel) for inference, or use unload() to get the base model back without the adapter."
)


@dataclass(frozen=True)
class AdapterSettings:
    """The per-adapter values a layer needs at forward time (kept apart from parameters, as PEFT does)."""

    r: int
    num_factors: int
    scaling: float
    plain: bool  # a plain rank-r LoRA (layers below mix_start_layer): all r factors, no router
    routing: str
    pooling: str
    router_grad: str
    cfs: str
    cfs_weight: float
    pairing: str
    router_noise: float
    aux_loss: bool

    @classmethod
    def from_config(cls, config: MixLoraConfig, plain: bool) -> AdapterSettings:
        return cls(
            r=config.r,
            num_factors=config.r if plain else config.num_factors,
            scaling=config.lora_alpha / config.r,
            plain=plain,
            routing=config.routing,
            pooling=config.pooling,
            router_grad=config.router_grad,
            cfs=config.cfs,
            cfs_weight=config.cfs_weight,
            pairing=config.pairing,
            router_noise=config.router_noise,
            aux_loss=config.router_aux_loss_coef > 0,
        )


class FactorRouter(nn.Module):
    """The routers of one adapter in one layer.

    Weights are parameters when the routers learn (router_grad != 'none') and persistent buffers otherwise, so
    that the reference behaviour (routers that never train) puts nothing router-related in the optimizer while
    the routers are still saved with the adapter.
    """

    def __init__(self, in_features: int, config: MixLoraConfig) -> None:
        super().__init__()
        self.trainable = config.router_grad != "none"
        E, r = config.num_factors, config.r
        if config.routing in ("ifs", "ifs+cfs"):
            self._add("weight_ifs", torch.empty(2, E, in_features))  # [0]: W_A, [1]: W_B (one matmul for both)
        if config.routing == "ifs+cfs":
            self._add("weight_cfs", torch.empty(r, in_features, E))  # W_AB in R^{r x d_in x E}
        if config.routing == "task":
            self._add("task_logits", torch.empty(2, config.num_tasks, E))  # [0]: A, [1]: B
        self.reset_parameters()

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if self.trainable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor, persistent=True)

    def get(self, name: str) -> torch.Tensor | None:
        return getattr(self, name, None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.get("weight_ifs") is not None:  # each like nn.Linear(d_in, E, bias=False), as the reference's
            for router in self.weight_ifs:
                nn.init.kaiming_uniform_(router, a=math.sqrt(5))
        if self.get("weight_cfs") is not None:  # like the reference's nn.Linear(r * d_in, E)
            r, d_in, _ = self.weight_cfs.shape
            bound = 1.0 / math.sqrt(r * d_in)
            self.weight_cfs.uniform_(-bound, bound)
        if self.get("task_logits") is not None:
            nn.init.normal_(self.task_logits)


class MixLoraLayer(BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ("mixlora_factors_a", "mixlora_factors_b", "mixlora_router")
    other_param_names: tuple[str, ...] = ("mixlora_settings", "mixlora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mixlora_factors_a = nn.ParameterDict({})  # adapter -> [E, d_in], row e is a_e
        self.mixlora_factors_b = nn.ParameterDict({})  # adapter -> [E, d_out], row e is b_e
        self.mixlora_router = nn.ModuleDict({})  # adapter -> FactorRouter
        self.mixlora_dropout = nn.ModuleDict({})
        self.mixlora_settings: dict[str, AdapterSettings] = {}
        # Set by the tuner: the module path (for routing traces and error messages) and the shared context.
        self.mixlora_layer_name: str = ""
        self.mixlora_context: RoutingContext | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MixLoRA adapts torch.nn.Linear layers only, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: MixLoraConfig, plain: bool) -> None:
        settings = AdapterSettings.from_config(config, plain)
        self.mixlora_settings[adapter_name] = settings
        self.mixlora_factors_a[adapter_name] = nn.Parameter(torch.empty(settings.num_factors, self.in_features))
        self.mixlora_factors_b[adapter_name] = nn.Parameter(torch.empty(settings.num_factors, self.out_features))
        if not plain and config.routing != "random":
            self.mixlora_router[adapter_name] = FactorRouter(self.in_features, config)
        self.mixlora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.reset_factors(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_factors(self, adapter_name: str, init_weights: bool = True) -> None:
        # a_e like nn.Linear rows (kaiming-uniform, a=sqrt(5)); b_e = 0 so training starts at the base model.
        nn.init.kaiming_uniform_(self.mixlora_factors_a[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.mixlora_factors_b[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.mixlora_factors_b[adapter_name], a=math.sqrt(5))


class Linear(nn.Module, MixLoraLayer):
    """A frozen nn.Linear plus one MixLoRA update per active adapter."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoraConfig, plain: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        MixLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, plain)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError(MERGE_ERROR)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise ValueError(MERGE_ERROR)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in self.mixlora_factors_a:
                result = self._add_update(result, x, adapter)
        return result

    def _add_update(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """result + s * B_x A_x x for every instance, as (x @ A_x^T) @ B_x^T: gathers and two batched matmuls."""
        settings = self.mixlora_settings[adapter]
        factors_a = self.mixlora_factors_a[adapter]
        factors_b = self.mixlora_factors_b[adapter]
        dropout = self.mixlora_dropout[adapter]
        x = self._cast_input_dtype(x, factors_a.dtype)
        if settings.plain:
            return result + (((dropout(x) @ factors_a.t()) * settings.scaling) @ factors_b).to(result.dtype)
        # Instances are the leading dimension; everything between it and the features is the sequence. Input of
        # shape (batch, features) is a batch of one-position sequences.
        seq = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 2 else x.view(1, 1, -1)
        batch, seq_len, _ = seq.shape
        context = self.mixlora_context
        segments = None if context is None else context.packed_segments(batch, seq_len)
        selection = self._select(seq, adapter, settings, segments)
        if segments is not None:
            return self._add_packed_update(result, seq, selection, adapter, settings, segments)
        r = settings.r
        # index_select, not advanced indexing: its backward is one index_add instead of a sort-based index_put.
        a_x = factors_a.index_select(0, selection.index_a.reshape(-1)).view(batch, r, self.in_features)
        b_x = factors_b.index_select(0, selection.index_b.reshape(-1)).view(batch, r, self.out_features)
        hidden = torch.bmm(dropout(seq), a_x.transpose(1, 2))  # [B, T, r]
        # The scale (and the pair coefficients) multiply the small [B, T, r] tensor, not the [B, T, d_out] update.
        if selection.coef is not None:
            hidden = hidden * (settings.scaling * selection.coef.to(hidden.dtype)).unsqueeze(1)
        else:
            hidden = hidden * settings.scaling
        if result.dtype == hidden.dtype:
            # The residual add fused into the second matmul: one pass over the [B, T, d_out] output, not two.
            flat = result.reshape(batch, seq_len, self.out_features)
            return torch.baddbmm(flat, hidden, b_x).view(result.shape)
        return result + torch.bmm(hidden, b_x).view(result.shape).to(result.dtype)

    def _add_packed_update(self, result: torch.Tensor, seq: torch.Tensor, selection: Selection, adapter: str,
                           settings: AdapterSettings, segments: PackedSegments) -> torch.Tensor:
        """result + s * B_n A_n x for each position x of packed rows, with (A_n, B_n) the factors of its record n.

        Records share rows, so no per-instance matmul applies. Every factor of the pool is applied instead, as a
        rank-E LoRA: x @ A^T gives all E coefficients [T, E]; each position keeps its record's r (a gather), scaled,
        and they are scattered to the columns of the record's B factors, so that one [T, E] @ [E, d_out] matmul adds
        the update. The same sums as the padded path's, at E/r times its adapter FLOPs (still a small share of the
        base layer's when d >> E), and gradients reach only the selected factors, as there.
        """
        factors_a = self.mixlora_factors_a[adapter]
        factors_b = self.mixlora_factors_b[adapter]
        flat = seq.reshape(-1, self.in_features)
        # A row's padding tail takes record 0's factors: it is an attention block of its own, never labelled, so its
        # output reaches no loss (the padded path updates its padding too).
        instance = segments.token_instance.to(flat.device)
        all_coefficients = self.mixlora_dropout[adapter](flat) @ factors_a.t()  # [T, E]
        hidden = all_coefficients.gather(1, selection.index_a.index_select(0, instance))  # [T, r]
        if selection.coef is not None:
            hidden = hidden * (settings.scaling * selection.coef.to(hidden.dtype).index_select(0, instance))
        else:
            hidden = hidden * settings.scaling
        spread = hidden.new_zeros(hidden.shape[0], settings.num_factors)
        spread = spread.scatter_add(1, selection.index_b.index_select(0, instance), hidden)  # [T, E]
        if result.dtype == hidden.dtype:
            return torch.addmm(result.reshape(-1, self.out_features), spread, factors_b).view(result.shape)
        return result + (spread @ factors_b).view(result.shape).to(result.dtype)

    def _select(self, seq: torch.Tensor, adapter: str, settings: AdapterSettings,
                segments: PackedSegments | None = None) -> Selection:
        """The factors of each instance: each row of seq, or with `segments` each packed record."""
        context = self.mixlora_context
        batch, seq_len, _ = seq.shape
        instances = batch if segments is None else segments.count
        if context is not None:
            cached = context.cached_selection(self.mixlora_layer_name, adapter, instances)
            if cached is not None:
                return cached
        router = self.mixlora_router[adapter] if adapter in self.mixlora_router else None
        factors_a = self.mixlora_factors_a[adapter]
        # With router_grad='none' selection is index-only: no graph is needed, and none is built.
        grad_mode = torch.enable_grad() if settings.router_grad != "none" else torch.no_grad()
        with grad_mode:
            if settings.routing in ("random", "task"):
                pooled = None
            elif segments is not None:
                pooled = segments.pool(seq, settings.pooling)
            else:
                pooled = pool(seq, None if context is None else context.pooling_mask(settings.pooling, batch, seq_len))
            if settings.router_grad == "straight_through":
                # Its forward leaves the pair coefficients out, so their gradient is a surrogate for the routers
                # alone. Through the pooled input and the A factors CFS reads, it would move the layers below and
                # the factors by a gradient of nothing the loss computes: on the suite, gradient norms rose to 1e4
                # and training diverged (BENCHMARKS.md, "MixLoRA against LoRA on the suite").
                pooled = None if pooled is None else pooled.detach()
                factors_a = factors_a.detach()
            selection = route(
                pooled,
                r=settings.r,
                num_factors=settings.num_factors,
                routing=settings.routing,
                router_grad=settings.router_grad,
                factors_a=factors_a,
                router_ifs=router.get("weight_ifs") if router else None,
                router_cfs=router.get("weight_cfs") if router else None,
                cfs=settings.cfs,
                cfs_weight=settings.cfs_weight,
                task_logits=router.get("task_logits") if router else None,
                task_ids=None if context is None else context.task_ids_for(instances, seq.device),
                noise_std=settings.router_noise if self.training else 0.0,
                pairing=settings.pairing,
                batch=instances,
                device=seq.device,
            )
        if context is not None:
            context.store(self.mixlora_layer_name, adapter, selection)
            if settings.aux_loss and self.training and torch.is_grad_enabled():
                # B's distribution: the combined (IFS + CFS) scores, renormalised to sum to one.
                probs_b = selection.scores_b / selection.scores_b.sum(dim=-1, keepdim=True)
                context.aux_losses[(self.mixlora_layer_name, adapter)] = load_balancing_loss(
                    selection.probs_a, selection.index_a
                ) + load_balancing_loss(probs_b, selection.index_b)
        return selection

    def __repr__(self) -> str:
        return "mixlora." + super().__repr__()
