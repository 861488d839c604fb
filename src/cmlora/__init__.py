"""cmlora: multimodal instruction tuning with Conditional Mixture-of-LoRA (MixLoRA).

Importing the package registers the "MIXLORA" adapter type with PEFT, so that `peft.get_peft_model`,
`save_pretrained` and `PeftModel.from_pretrained` work with `MixLoraConfig`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from . import _peft_registration
from .config import MixLoraConfig
from .context import RoutingRecord, RoutingTrace
from .layer import MixLoraLayer
from .model import MixLoraModel

_peft_registration.register(MixLoraConfig, MixLoraModel)

__version__ = "0.1.0"


def _tuners(model: nn.Module) -> list[MixLoraModel]:
    return [m for m in model.modules() if isinstance(m, MixLoraModel)]


@contextlib.contextmanager
def trace_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record the factors selected by every MixLoRA layer of `model` (a PeftModel or anything holding one).

    >>> with cmlora.trace_routing(peft_model) as trace:
    ...     peft_model(**batch)
    >>> trace.indices("model.layers.0.self_attn.q_proj", "a")   # LongTensor [instances, r]
    """
    tuners = _tuners(model)
    if not tuners:
        raise ValueError("trace_routing: the model holds no MixLoRA adapter (wrap it with peft.get_peft_model).")
    with contextlib.ExitStack() as stack:
        traces = [stack.enter_context(t.trace_routing()) for t in tuners]
        trace = traces[0]
        for other in traces[1:]:  # several tuners in one model are rare; share one record dict between them
            other.records = trace.records
        yield trace


__all__ = ["MixLoraConfig", "MixLoraModel", "MixLoraLayer", "RoutingTrace", "RoutingRecord", "trace_routing"]
