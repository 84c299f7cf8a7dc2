"""Typed configuration: model shapes and the catalog, per-instance settings, cluster YAML."""

from pdserve.config.engine import (
    CacheConfig,
    ConfigError,
    DecodeConfig,
    PrefillConfig,
    SchedulerConfig,
    TransferConfig,
    from_dict,
)
from pdserve.config.model import CATALOG, ModelConfigError, ModelShape, resolve_shape

__all__ = [
    "CATALOG",
    "CacheConfig",
    "ConfigError",
    "DecodeConfig",
    "ModelConfigError",
    "ModelShape",
    "PrefillConfig",
    "SchedulerConfig",
    "TransferConfig",
    "from_dict",
    "resolve_shape",
]
