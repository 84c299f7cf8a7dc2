"""Fault injection for drills and alert tests: make one role's engine steps slower.

`fault_prefill_delay_ms` delays every prefill-role step (a prefill batch), `fault_decode_step_delay_ms`
every decode-role step. `fault_delay_file` (JSON with either key) overrides both while it exists and
is re-read at most once a second, so a running cluster can be made slow and fast again without a
restart. Off (all zero, no file) it costs one comparison per step.
"""

from __future__ import annotations

import json
import os

KEYS = {"prefill": "fault_prefill_delay_ms", "decode": "fault_decode_step_delay_ms"}
REREAD_S = 1.0


class StepDelay:
    """The current extra seconds per engine step of one worker's role."""

    def __init__(self, role: str, prefill_ms: float, decode_ms: float, path: str = "") -> None:
        self.key = KEYS.get(role, "")
        self.static_ms = {"prefill": prefill_ms, "decode": decode_ms}.get(role, 0.0)
        self.path = path
        self._file_ms: float | None = None
        self._read_at = float("-inf")
        self._mtime: float | None = None

    @property
    def configured(self) -> bool:
        return bool(self.key) and bool(self.static_ms or self.path)

    def seconds(self, now: float) -> float:
        """The delay to add to a step starting `now` (monotonic seconds)."""
        if not self.key:
            return 0.0
        if self.path and now - self._read_at >= REREAD_S:
            self._read_at = now
            self._reread()
        ms = self._file_ms if self._file_ms is not None else self.static_ms
        return max(0.0, ms) / 1e3

    def _reread(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            self._file_ms, self._mtime = None, None
            return
        if mtime == self._mtime:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
            self._file_ms = float(data.get(self.key, 0.0))
            self._mtime = mtime
        except (OSError, ValueError, AttributeError):
            pass  # a half-written file: keep the last value and read again next time
