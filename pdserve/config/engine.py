"""The per-instance policy configs (cache, scheduling, transfer), as the engine and `sched/` import them.

They are defined, with their defaults and help, in `pdserve.config.schema`; this module only names them.
"""

from pdserve.config.schema import (
    CacheConfig,
    ConfigError,
    DecodeConfig,
    PrefillConfig,
    SchedulerConfig,
    TransferConfig,
)

__all__ = ["CacheConfig", "ConfigError", "DecodeConfig", "PrefillConfig", "SchedulerConfig", "TransferConfig"]
