"""Decode steps as CUDA graphs: one graph per batch-size bucket, captured at start-up, replayed per step.

A decode step launches hundreds of small kernels; at small batch the host cannot launch them as
fast as the GPU runs them. A graph replays the whole step with one launch. It needs every input at
a fixed address with a fixed shape, so a step's rows are written into static buffers sized for the
bucket (the smallest captured batch size >= the real batch) and the rest of the bucket is padding.
Padding rows write their K/V into a null block the block manager never hands out and attend only
to it, so they write and read nothing any sequence owns. Attention reads block tables and context
lengths from the buffers (`model/paged_attention_triton.py`), so one graph serves any contexts.

The bucket choice, the padding and the buffer filling are plain code that runs (and is tested) on
CPU, where the same static-buffer forward runs eagerly; capture and replay run only on CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pdserve.config.schema import CacheConfig
from pdserve.model.paged_attention_triton import DecodeMetadata
from pdserve.sched.output import SchedulerOutput

if TYPE_CHECKING:
    from pdserve.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def buckets_up_to(max_batch: int) -> list[int]:
    """The captured batch sizes: the standard ones below max_batch, and max_batch itself."""
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds n rows; None when n is beyond the largest (run eagerly)."""
    return next((b for b in buckets if b >= n), None) if n > 0 else None


@dataclass
class DecodeRows:
    """A pure decode step as host lists: one row per sequence, in chunk order."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]  # each row's blocks up to and including its new token's

    def __len__(self) -> int:
        return len(self.token_ids)


def decode_rows(out: SchedulerOutput, block_size: int) -> DecodeRows | None:
    """The step's rows if every chunk is one sampled token, else None (a prefill: not graphed)."""
    rows = DecodeRows([], [], [], [])
    for chunk in out.chunks:
        if chunk.num_tokens != 1 or not chunk.sample:
            return None
        req, p = chunk.request, chunk.start
        n_prompt = len(req.prompt_token_ids)
        rows.token_ids.append(req.prompt_token_ids[p] if p < n_prompt else req.output_token_ids[p - n_prompt])
        rows.positions.append(p)
        blk = p // block_size
        rows.slots.append(req.block_ids[blk] * block_size + p % block_size)
        rows.tables.append(req.block_ids[: blk + 1])
    return rows if rows.token_ids else None


class StaticInputs:
    """The graphs' input buffers on the device, and the host staging they are filled from.

    `fill` writes a step's rows and the bucket's padding into the host arrays, then copies the
    bucket's part to the device in one asynchronous copy per buffer (pinned host memory on CUDA).
    """

    def __init__(self, max_batch: int, width: int, null_block: int, block_size: int, device: torch.device) -> None:
        self.max_batch, self.width, self.block_size = max_batch, width, block_size
        self.null_block, self.null_slot = null_block, null_block * block_size
        self.device = device
        cuda = device.type == "cuda"

        def pair(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(*shape, dtype=dtype, pin_memory=cuda)
            return host, torch.zeros(*shape, dtype=dtype, device=device)

        self.h_ids, self.ids = pair(max_batch, dtype=torch.long)
        self.h_pos, self.positions = pair(max_batch, dtype=torch.long)
        self.h_slots, self.slots = pair(max_batch, dtype=torch.long)
        self.h_lens, self.context_lens = pair(max_batch, dtype=torch.int32)
        self.h_tables, self.tables = pair(max_batch, width, dtype=torch.int32)
        self.tables.fill_(null_block)
        self.h_tables.fill_(null_block)
        # Set after each copy: the host arrays are not rewritten until the copy has read them.
        self._copied: torch.cuda.Event | None = None

    def fill(self, rows: DecodeRows, bucket: int) -> bool:
        """Stage `rows` padded to `bucket`; False (nothing written) if a table is wider than the buffers."""
        n = len(rows)
        assert n <= bucket <= self.max_batch
        w = max((len(t) for t in rows.tables), default=1)
        if w > self.width:
            return False
        if self._copied is not None:
            self._copied.synchronize()  # long done in practice: the last step's logits were read since
        ids, pos, slots, lens = (t.numpy() for t in (self.h_ids, self.h_pos, self.h_slots, self.h_lens))
        tables = self.h_tables.numpy()
        ids[:n], pos[:n], slots[:n] = rows.token_ids, rows.positions, rows.slots
        lens[:n] = np.asarray(rows.positions) + 1
        for i, t in enumerate(rows.tables):
            tables[i, : len(t)] = t  # columns past a row's context are never read: no need to clear them
        # Padding: token 0 at position 0, written to the null slot, attending to the null block only.
        ids[n:bucket], pos[n:bucket], slots[n:bucket], lens[n:bucket] = 0, 0, self.null_slot, 1
        tables[n:bucket, 0] = self.null_block
        nb = self.device.type == "cuda"
        for dev, host in ((self.ids, self.h_ids), (self.positions, self.h_pos), (self.slots, self.h_slots),
                          (self.context_lens, self.h_lens)):
            dev[:bucket].copy_(host[:bucket], non_blocking=nb)
        self.tables[:bucket, :w].copy_(self.h_tables[:bucket, :w], non_blocking=nb)
        if nb:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return True

    def metadata(self, bucket: int) -> DecodeMetadata:
        return DecodeMetadata(self.slots[:bucket], self.tables[:bucket], self.context_lens[:bucket])


class DecodeGraphs:
    """Runs pure decode steps of up to `max_batch` rows from static buffers; on CUDA, as replayed graphs.

    The runner's KV cache must keep `null_block` out of the block manager's hands (see `attach`).
    """

    def __init__(self, runner: ModelRunner, max_batch: int, null_block: int, capture: bool) -> None:
        self.runner = runner
        self.buckets = buckets_up_to(max_batch)
        s, bs = runner.shape, runner.block_size
        width = -(-min(s.max_model_len, null_block * bs) // bs)
        self.inputs = StaticInputs(max_batch, max(1, width), null_block, bs, runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self.capture()

    def _forward(self, bucket: int) -> torch.Tensor:
        inp = self.inputs
        meta = inp.metadata(bucket)
        # `need` given: the table is sized once, and no host sync (max of positions) lands in a graph.
        cos, sin = self.runner.model.rope.table(inp.positions[:bucket], need=self.runner.shape.max_model_len)
        meta.cos, meta.sin = cos.to(self.runner.dtype), sin.to(self.runner.dtype)
        hidden = self.runner.model(inp.ids[:bucket], inp.positions[:bucket], self.runner.kv_caches, meta)
        return self.runner.model.logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:  # pragma: no cover - needs CUDA
        """Capture every bucket, largest first (the smaller ones reuse its memory pool)."""
        pool = None
        empty = DecodeRows([], [], [], [])
        for b in reversed(self.buckets):
            self.inputs.fill(empty, b)  # all padding: warm-up and capture touch only the null block
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: compiles the kernels, sizes workspaces
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor | None:
        """float32 logits of a pure decode step (chunk order), or None if this step is not for a graph."""
        rows = decode_rows(out, self.runner.block_size)
        if rows is None:
            return None
        b = bucket_for(len(rows), self.buckets)
        if b is None or not self.inputs.fill(rows, b):
            return None
        graph = self.graphs.get(b)
        if graph is None:
            return self._forward(b)[: len(rows)]
        graph.replay()
        return self.outputs[b][: len(rows)].clone()  # the static output is overwritten by the next replay


def attach(runner: ModelRunner, cache: CacheConfig) -> DecodeGraphs | None:
    """On CUDA (unless enforce_eager): keep the cache's last block as the null block, capture the graphs."""
    if runner.device.type != "cuda" or cache.enforce_eager:
        return None
    runner.num_blocks -= 1  # the last block: padding rows' scratch, never handed out
    return DecodeGraphs(runner, cache.cuda_graph_max_batch, null_block=runner.num_blocks, capture=True)
