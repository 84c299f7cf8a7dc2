"""The cluster of `pdserve up` and `pdserve sim`: one YAML file (or flags) read into the schema.

    model: demo
    prefill: {workers: 1, max_batch_tokens: 2048, max_wait_ms: 50}
    decode: {workers: 1, max_batch_size: 64}
    router: {port: 8000, disagg_threshold: 0}

Every key, its default and its help: `pdserve config` (defined in `pdserve.config.schema`).
"""

from pdserve.config.load import cluster_from_dict, load_cluster_file
from pdserve.config.schema import SECTIONS, ClusterConfig, ColocatedSection, DecodeSection, PrefillSection

__all__ = ["SECTIONS", "ClusterConfig", "ColocatedSection", "DecodeSection", "PrefillSection", "cluster_from_dict",
           "load_cluster_file"]
