from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.procs import MARK, kill_and_wait, marked, wait_gone

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _mark_processes() -> Iterator[str]:
    """Every process the suite starts inherits this mark, so one left behind can be found."""
    value = uuid.uuid4().hex
    os.environ[MARK] = value
    yield value
    left = kill_and_wait(marked(value))
    assert not left, f"processes {left} survived SIGKILL"


@pytest.fixture(scope="module", autouse=True)
def _no_process_left_behind(_mark_processes: str) -> Iterator[None]:
    """After each test module (its clusters stopped): no process it started may still run.
    Stopping is allowed to take a while (workers drain), not to leave orphans."""
    yield
    left = wait_gone(marked(_mark_processes), timeout=15.0)
    if left:
        names = {pid: " ".join(_cmd(pid))[:120] for pid in left}
        kill_and_wait(left)
        pytest.fail(f"the module left processes running: {names}")


def _cmd(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ["?"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random-weight HF model folder per supported architecture."""
    from tests.tiny_models import ARCHS, make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHS}
