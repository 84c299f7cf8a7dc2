"""Typed configuration: model shapes and the catalog, and the one schema of every setting (`schema.py`)."""

from pdserve.config.load import cluster_from_dict, convert, load_cluster_file
from pdserve.config.model import CATALOG, ModelConfigError, ModelShape, resolve_shape
from pdserve.config.schema import (
    CacheConfig,
    ClusterConfig,
    ConfigError,
    DecodeConfig,
    PrefillConfig,
    RouterConfig,
    SchedulerConfig,
    TransferConfig,
)

__all__ = [
    "CATALOG",
    "CacheConfig",
    "ClusterConfig",
    "ConfigError",
    "DecodeConfig",
    "ModelConfigError",
    "ModelShape",
    "PrefillConfig",
    "RouterConfig",
    "SchedulerConfig",
    "TransferConfig",
    "cluster_from_dict",
    "convert",
    "load_cluster_file",
    "resolve_shape",
]
