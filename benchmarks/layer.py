"""Forward+backward time and peak memory of ONE adapted linear layer: MixLoRA vs PEFT LoRA vs materialised.

Run from the repository root:

    python benchmarks/layer.py            # LLaVA-7B shapes 4096x4096 and 11008x4096, batch 4, seq 256
    python benchmarks/layer.py --quick    # tiny smoke test (256x256, batch 2, seq 16, 2 reps)
    python benchmarks/layer.py --device cuda --dtype bfloat16 --reps 50

It prints one JSON object to stdout (progress goes to stderr).

Variants, all sharing one frozen base weight W [d_out, d_in] (no bias) and one input x [batch, seq, d_in] with
requires_grad=False; one step is `out = f(x); out.float().pow(2).mean().backward()`, gradients set to None
between steps (outside the timed region):

- base: the frozen nn.Linear alone. Nothing requires grad, so its step is forward + loss only; it is the
  reference for the memory overhead of the adapters.
- mixlora: cmlora's layer, built by peft.get_peft_model on a one-Linear wrapper module with
  MixLoraConfig(num_factors=32, r=8, routing="ifs+cfs", pooling="all", router_grad="none"). The wrapper is
  called, so the routing-context hook, pooling over all positions (the wrapper passes no attention mask),
  IFS+CFS routing and the gather + two batched matmuls are all timed.
- mixlora_scores: the same with router_grad="scores" (routers are trainable parameters; pairs are scaled).
- mixlora_scores_index: mixlora_scores with pairing="index" (the selected factors matched in factor order: two
  sorts of [instances, r] more per call).
- mixlora_packed: the mixlora variant on packed rows: each row of x holds 4 records of seq/4 positions, named by
  `mixlora_segment_ids`, so each record is pooled and routed alone and its factors applied to its positions as a
  rank-E update (all E coefficients, then a gather and a scatter of each record's r; `Linear._add_packed_update`).
- peft_lora: PEFT's LoraConfig(r=8, lora_alpha=16) on the same wrapper.
- materialised: the reference code's arithmetic. Same routing (cmlora.routing.pool / route, with the factors
  and routers copied from the mixlora variant, so both select the same factors), but each instance's update
  matrix delta_W_b = A_x^T B_x [d_in, d_out] is materialised and applied as torch.matmul(x, delta_W) * s.

Timing: after `--warmup` rounds, `--reps` rounds; in each round every variant runs once, in an order rotated
by one position per round, so machine noise hits all variants alike. The median per variant is reported
(CUDA: torch.cuda.synchronize around each step).

Peak memory: one extra step per variant, outside the timed rounds, reporting the peak of bytes allocated
during the step above the level just before it (activations, temporaries and gradients created by the step;
parameters and buffers that exist beforehand are listed separately as adapter_state_bytes).
- CUDA: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, minus memory_allocated.
- CPU: tracemalloc does not see torch's allocator, so the step runs under
  torch.profiler.profile(activities=[CPU], profile_memory=True); the profiler's "[memory]" events carry the
  CPU allocator's running "Total Allocated" counter, whose maximum minus its value before the first event is
  the peak.

Targets (meaningful at full size only): mixlora/peft_lora time <= 1.00, mixlora/peft_lora peak memory
<= 1.05, materialised/mixlora time >= 2.5.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import peft
import torch
from torch import nn

import cmlora
from cmlora.routing import pool, route

NUM_FACTORS = 32
RANK = 8
RECORDS_PER_ROW = 4
LLAVA_7B_SHAPES = "4096x4096,11008x4096"
QUICK = {"shapes": "256x256", "batch": 2, "seq": 16, "reps": 2}
MIB = 2**20
TARGETS = {  # ratio name -> (comparison, bound)
    "time_mixlora_over_peft_lora": ("<=", 1.00),
    "memory_mixlora_over_peft_lora": ("<=", 1.05),
    "time_materialised_over_mixlora": (">=", 2.5),
}


# ----------------------------------------------------------------------------------------------- variants
class OneLinear(nn.Module):
    """A model holding one nn.Linear named `proj`, whose weight is the shared frozen base weight."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        self.proj = nn.Linear(d_in, d_out, bias=False, device="meta")
        self.proj.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def mixlora_config(router_grad: str, pairing: str = "score") -> cmlora.MixLoraConfig:
    return cmlora.MixLoraConfig(num_factors=NUM_FACTORS, r=RANK, target_modules=["proj"], routing="ifs+cfs",
                                pooling="all", router_grad=router_grad, pairing=pairing, init_weights=False)


def build_mixlora(weight: nn.Parameter, router_grad: str, pairing: str = "score") -> nn.Module:
    return peft.get_peft_model(OneLinear(weight), mixlora_config(router_grad, pairing))


class PackedMixLora(nn.Module):
    """The mixlora variant called with segment ids: RECORDS_PER_ROW records per row of x, each routed alone."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.model = build_mixlora(weight, "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, seq = x.shape[0], x.shape[1]
        per_row = torch.arange(seq, device=x.device) * RECORDS_PER_ROW // seq  # 0,0,..,1,1,..: contiguous records
        ids = per_row.unsqueeze(0) + RECORDS_PER_ROW * torch.arange(rows, device=x.device).unsqueeze(1)
        return self.model(x, mixlora_segment_ids=ids)


def build_peft_lora(weight: nn.Parameter) -> nn.Module:
    config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"])
    return peft.get_peft_model(OneLinear(weight), config)


class MaterialisedMixLora(nn.Module):
    """MixLoRA as the reference code computes it: h = W x + s * x (A_x^T B_x), delta_W built per instance."""

    def __init__(self, weight: nn.Parameter, mixlora_layer: nn.Module, config: cmlora.MixLoraConfig) -> None:
        super().__init__()
        self.base = OneLinear(weight)
        self.config = config
        self.scaling = config.lora_alpha / config.r
        # Copies of the MixLoRA layer's factors and (frozen) routers: both variants select the same factors.
        self.factors_a = nn.Parameter(mixlora_layer.mixlora_factors_a["default"].detach().clone())
        self.factors_b = nn.Parameter(mixlora_layer.mixlora_factors_b["default"].detach().clone())
        router = mixlora_layer.mixlora_router["default"]
        for name in ("weight_ifs", "weight_cfs"):
            self.register_buffer(name, getattr(router, name).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.factors_a.dtype)
        with torch.no_grad():
            selection = route(pool(x, None), r=self.config.r, num_factors=self.config.num_factors,
                              routing="ifs+cfs", router_grad="none", factors_a=self.factors_a,
                              router_ifs=self.weight_ifs, router_cfs=self.weight_cfs,
                              cfs=self.config.cfs, cfs_weight=self.config.cfs_weight)
        lora_a = self.factors_a[selection.index_a].transpose(1, 2)  # [B, d_in, r]
        lora_b = self.factors_b[selection.index_b]  # [B, r, d_out]
        delta_w = torch.matmul(lora_a, lora_b)  # [B, d_in, d_out]: what MixLoRA never builds
        return result + (torch.matmul(x, delta_w) * self.scaling).to(result.dtype)


def mixlora_layer(model: nn.Module) -> nn.Module:
    """The MixLoRA layer that get_peft_model put in place of `proj`."""
    return model.base_model.model.proj


def build_variants(weight: nn.Parameter) -> dict[str, nn.Module]:
    """The seven variants of one shape/device/dtype, all on the shared frozen weight."""
    weight.requires_grad_(False)
    mixlora = build_mixlora(weight, "none")
    variants = {
        "base": OneLinear(weight),
        "mixlora": mixlora,
        "mixlora_scores": build_mixlora(weight, "scores"),
        "mixlora_scores_index": build_mixlora(weight, "scores", pairing="index"),
        "mixlora_packed": PackedMixLora(weight),
        "peft_lora": build_peft_lora(weight),
        "materialised": MaterialisedMixLora(weight, mixlora_layer(mixlora), mixlora.peft_config["default"]),
    }
    for module in variants.values():
        module.train()
    return variants


# ----------------------------------------------------------------------------------------------- measuring
def run_step(module: nn.Module, x: torch.Tensor) -> None:
    loss = module(x).float().pow(2).mean()
    if loss.requires_grad:  # the frozen base alone has nothing to train
        loss.backward()


def zero_grads(module: nn.Module) -> None:
    for param in module.parameters():
        param.grad = None


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_step(module: nn.Module, x: torch.Tensor) -> float:
    sync = synchronizer(x.device)
    zero_grads(module)
    sync()
    start = time.perf_counter()
    run_step(module, x)
    sync()
    return time.perf_counter() - start


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak CPU bytes allocated by torch during `step`, from the profiler's allocator counter."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0
    memory.sort(key=lambda a: a.get("Ev Idx", 0))
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(a["Total Allocated"] for a in memory) - before


def peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    zero_grads(module)
    if x.device.type != "cuda":
        return cpu_peak_bytes(lambda: run_step(module, x))
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    start = torch.cuda.memory_allocated(x.device)
    run_step(module, x)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - start


def round_robin_times(variants: dict[str, nn.Module], x: torch.Tensor, reps: int,
                      warmup: int) -> dict[str, list[float]]:
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + reps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = time_step(variants[name], x)
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def adapter_state_bytes(module: nn.Module, weight: torch.Tensor) -> int:
    """Bytes of the module's parameters and buffers, the shared base weight excluded."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t is not weight]
    return sum(t.numel() * t.element_size() for t in tensors)


def max_relative_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        out_a, out_b = a(x).float(), b(x).float()
    return float((out_a - out_b).abs().max() / out_a.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- reporting
def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator > 0 else None


def ratios(stats: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    secs = {name: s["median_s"] for name, s in stats.items()}
    mem = {name: s["peak_bytes"] for name, s in stats.items()}
    over = {name: s["overhead_vs_base_bytes"] for name, s in stats.items()}
    return {
        "time_mixlora_over_peft_lora": ratio(secs["mixlora"], secs["peft_lora"]),
        "memory_mixlora_over_peft_lora": ratio(mem["mixlora"], mem["peft_lora"]),
        "memory_overhead_vs_base_mixlora_over_peft_lora": ratio(over["mixlora"], over["peft_lora"]),
        "time_materialised_over_mixlora": ratio(secs["materialised"], secs["mixlora"]),
        "memory_materialised_over_mixlora": ratio(mem["materialised"], mem["mixlora"]),
        "time_mixlora_scores_over_mixlora": ratio(secs["mixlora_scores"], secs["mixlora"]),
        "time_mixlora_scores_over_peft_lora": ratio(secs["mixlora_scores"], secs["peft_lora"]),
        "memory_mixlora_scores_over_peft_lora": ratio(mem["mixlora_scores"], mem["peft_lora"]),
        "time_mixlora_scores_index_over_mixlora_scores": ratio(secs["mixlora_scores_index"], secs["mixlora_scores"]),
        "time_mixlora_packed_over_peft_lora": ratio(secs["mixlora_packed"], secs["peft_lora"]),
        "memory_mixlora_packed_over_peft_lora": ratio(mem["mixlora_packed"], mem["peft_lora"]),
    }


def check_targets(values: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    checks = {}
    for name, (op, bound) in TARGETS.items():
        value = values[name]
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        checks[name] = {"value": value, "target": f"{op} {bound:.2f}", "met": met}
    return checks


def variant_stats(times: list[float], peak: int, base_peak: int, state: int,
                  trainable: int) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_bytes": peak,
        "peak_mib": round(peak / MIB, 3),
        "overhead_vs_base_bytes": peak - base_peak,
        "overhead_vs_base_mib": round((peak - base_peak) / MIB, 3),
        "adapter_state_bytes": state,
        "trainable_params": trainable,
    }


def benchmark_config(device: torch.device, dtype: torch.dtype, d_in: int, d_out: int, batch: int, seq: int,
                     reps: int, warmup: int) -> dict[str, Any]:
    """Build the variants for one shape/device/dtype, time them round-robin, then measure peak memory."""
    torch.manual_seed(0)
    weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in**0.5
    weight = nn.Parameter(weight, requires_grad=False)
    x = torch.randn(batch, seq, d_in, device=device, dtype=dtype)
    variants = build_variants(weight)
    times = round_robin_times(variants, x, reps, warmup)
    peaks = {name: peak_bytes(module, x) for name, module in variants.items()}
    stats = {
        name: variant_stats(times[name], peaks[name], peaks["base"], adapter_state_bytes(module, weight),
                            sum(p.numel() for p in module.parameters() if p.requires_grad))
        for name, module in variants.items()
    }
    values = ratios(stats)
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "d_in": d_in,
        "d_out": d_out,
        "batch": batch,
        "seq": seq,
        "reps": reps,
        "warmup": warmup,
        "adapter_dtype": str(mixlora_layer(variants["mixlora"]).mixlora_factors_a["default"].dtype),
        "materialised_vs_mixlora_max_rel_diff": max_relative_difference(
            variants["mixlora"], variants["materialised"], x),
        "variants": stats,
        "ratios": values,
        "targets": check_targets(values),
    }


# ----------------------------------------------------------------------------------------------- command line
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(devices: list[torch.device]) -> dict[str, Any]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "cmlora": cmlora.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if any(d.type == "cuda" for d in devices):
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda_version"] = torch.version.cuda
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds (default: 10 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                        help="auto: CPU, plus CUDA when available")
    parser.add_argument("--dtype", default="auto",
                        help="comma-separated torch dtypes, e.g. float32,bfloat16 (auto: float32 on CPU, "
                             "bfloat16 and float32 on CUDA)")
    parser.add_argument("--shapes", default=None, help=f"d_inxd_out list (default: {LLAVA_7B_SHAPES})")
    parser.add_argument("--batch", type=int, default=None, help="default: 4")
    parser.add_argument("--seq", type=int, default=None, help="default: 256")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 256x256, batch 2, seq 16, 2 reps (explicit flags still win)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"shapes": LLAVA_7B_SHAPES, "batch": 4, "seq": 256, "reps": None}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def resolve_devices(choice: str) -> list[torch.device]:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def resolve_dtypes(choice: str, device: torch.device) -> list[torch.dtype]:
    if choice == "auto":
        return [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    dtypes = [getattr(torch, name.strip().removeprefix("torch."), None) for name in choice.split(",")]
    if not all(isinstance(d, torch.dtype) for d in dtypes):
        raise SystemExit(f"--dtype: unknown dtype in {choice!r}")
    return dtypes


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        d_in, d_out = item.lower().split("x")
        shapes.append((int(d_in), int(d_out)))
    return shapes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = resolve_devices(args.device)
    results = []
    for device in devices:
        reps = args.reps if args.reps is not None else (30 if device.type == "cuda" else 10)
        for dtype in resolve_dtypes(args.dtype, device):
            for d_in, d_out in parse_shapes(args.shapes):
                print(f"[layer benchmark] {device} {dtype} {d_in}x{d_out} batch {args.batch} seq {args.seq} "
                      f"reps {reps}", file=sys.stderr, flush=True)
                results.append(benchmark_config(device, dtype, d_in, d_out, args.batch, args.seq, reps,
                                                args.warmup))
    report = {
        "benchmark": "one adapted Linear layer, forward+backward",
        "quick": args.quick,
        "notes": [
            "step = forward of the called module + loss out.float().pow(2).mean() + backward; x has no grad",
            "mixlora variants include the routing hook, 'all' pooling (no attention mask), IFS+CFS routing",
            "base = frozen Linear alone: forward + loss only (nothing to train), the memory reference",
            "peak_bytes = peak allocated during one step above the level before it (CPU: torch.profiler "
            "allocator counter; CUDA: max_memory_allocated); adapter parameters and buffers are in "
            "adapter_state_bytes",
            "times: median over reps of round-robin rounds with rotated variant order, after warmup rounds",
        ],
        "config": {"num_factors": NUM_FACTORS, "r": RANK, "peft_lora_alpha": 16,
                   "mixlora_lora_alpha": mixlora_config("none").lora_alpha, "warmup": args.warmup},
        "environment": environment(devices),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
