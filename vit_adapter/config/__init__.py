"""The one typed-config loader shared by train (engine/config.py), pretrain and sweep (see ``typed``)."""

from .typed import (
    ConfigError,
    build_dataclass,
    check_dataclass,
    check_value,
    coerce,
    describe,
    hints,
    parse_yaml,
    read_yaml,
    reject_non_finite,
    suggest,
    type_message,
)

__all__ = [
    "ConfigError",
    "build_dataclass",
    "check_dataclass",
    "check_value",
    "coerce",
    "describe",
    "hints",
    "parse_yaml",
    "read_yaml",
    "reject_non_finite",
    "suggest",
    "type_message",
]
