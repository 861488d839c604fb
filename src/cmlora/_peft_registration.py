"""Adding the MIXLORA adapter type to PEFT.

PEFT's `register_peft_method` only accepts names that are members of its closed `PeftType` enum, so the member is
added to the enum first. This reaches into `enum` internals (`_member_map_`, `_value2member_map_`,
`_member_names_`), which is why it lives here, alone, and why pyproject.toml pins peft to the tested range.
Everything else in the package goes through PEFT's public API.
"""

from __future__ import annotations

import peft
from peft.utils import PeftType, register_peft_method

PEFT_METHOD_NAME = "mixlora"
PREFIX = "mixlora_"
TESTED_PEFT = ((0, 21), (0, 22))  # [lower, upper)


def _peft_version() -> tuple[int, int]:
    major, minor = peft.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _add_enum_member(enum_cls: type, name: str) -> object:
    """Return enum_cls[name], adding the member to the (str-valued) enum if it is missing."""
    if name in enum_cls._member_map_:
        return enum_cls._member_map_[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    # The class attribute must be set before the member map knows the name: EnumType refuses to reassign members.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


def _check_peft_version() -> None:
    lower, upper = TESTED_PEFT
    if not lower <= _peft_version() < upper:
        raise ImportError(
            f"cmlora was tested with peft>={lower[0]}.{lower[1]},<{upper[0]}.{upper[1]} and found peft "
            f"{peft.__version__}. Install a tested version: pip install 'peft>={lower[0]}.{lower[1]},"
            f"<{upper[0]}.{upper[1]}'."
        )


_check_peft_version()
MIXLORA_PEFT_TYPE = _add_enum_member(PeftType, PEFT_METHOD_NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Register the tuner with PEFT (idempotent: importing cmlora twice, or reloading it, is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if MIXLORA_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
