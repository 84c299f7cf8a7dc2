"""The launcher interface on its local side, and the local path without Ray.

`LocalLauncher` grows and shrinks a pool through the same calls the Ray launcher answers, and the
router's pools follow it (`serving.sync_pools`); `pdserve up` without `--launcher ray` never
imports ray, and with it but no Ray installed says what to install.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.config.load import cluster_from_dict
from tests import probes
from tests.procs import alive, cmdline, descendants, wait_gone

SECRET = "interface-secret"
NO_RAY = "import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ModuleNotFoundError


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_local_path_never_imports_ray() -> None:
    r = _python("import sys\n"
                "from pdserve.cli import build_parser\n"
                "from pdserve.config.load import cluster_from_dict\n"
                "from pdserve.launch.base import make_launcher\n"
                "import pdserve.launch.serving, pdserve.serve.router\n"
                "build_parser().parse_args(['up', '--decode', '1'])\n"
                "launcher = make_launcher(cluster_from_dict({}))\n"
                "assert type(launcher).__name__ == 'LocalLauncher'\n"
                "assert 'ray' not in sys.modules, 'the local path imported ray'\n")
    assert r.returncode == 0, r.stderr


def test_launcher_ray_without_ray_installed_is_a_one_line_error() -> None:
    r = _python(NO_RAY + "from pdserve.cli import main\n"
                "sys.exit(main(['up', '--launcher', 'ray', '--port', '0']))\n")
    assert r.returncode == 2, r.stderr
    assert "pip install 'pdserve[ray]'" in r.stderr and "Traceback" not in r.stderr


def test_placement_flags_reach_the_config() -> None:
    from pdserve.cli import build_parser
    from pdserve.config.flags import cluster_from_args

    args = build_parser().parse_args(["up", "--launcher", "ray", "--ray-address", "auto",
                                      "--decode-ray-resources", "GPU=1,node_b=0.5", "--decode-ray-strategy",
                                      "spread", "--ray-bind-node-address"])
    cfg = cluster_from_args(args)
    assert cfg.decode.ray_resources == {"GPU": 1.0, "node_b": 0.5} and cfg.decode.ray_strategy == "spread"
    assert cfg.prefill.ray_resources == {} and cfg.launch.ray_bind_node_address
    assert (cfg.launch.launcher, cfg.launch.ray_address) == ("ray", "auto")
    pytest.importorskip("ray")
    from pdserve.launch.ray_launcher import actor_options

    opts = actor_options(cfg.decode.ray_resources, cfg.decode.ray_strategy, 3)
    assert opts["num_gpus"] == 1.0 and opts["resources"] == {"node_b": 0.5} and "num_cpus" not in opts
    assert opts["scheduling_strategy"] == "SPREAD" and opts["max_restarts"] == 3


@pytest.mark.slow
def test_local_launcher_adds_and_removes_a_worker_and_the_router_follows() -> None:
    from pdserve.config.model import resolve_shape
    from pdserve.launch.local import LocalLauncher
    from pdserve.launch.serving import sync_pools
    from pdserve.serve.router import ClusterBackend

    cfg = cluster_from_dict({"threads": 1, "prefill": {"workers": 0}, "decode": {"workers": 0},
                             "colocated": {"workers": 1}})
    launcher = LocalLauncher(cfg)
    try:
        first = launcher.start(SECRET)
        assert [w.name for w in first] == ["colocated-0"]

        async def scenario() -> None:
            backend = ClusterBackend(resolve_shape("demo"), [], [], [], secret=SECRET.encode())
            known: set[tuple[str, str]] = set()
            await sync_pools(backend, launcher, known)
            assert [w.client.address for w in backend.workers] == [first[0].address]
            added = await asyncio.to_thread(launcher.add_worker, "colocated")
            assert added.name == "colocated-1" and probes.stats(int(added.address.rsplit(":")[1]),
                                                                SECRET.encode()).role == "colocated"
            await sync_pools(backend, launcher, known)
            assert sorted(w.client.address for w in backend.workers) == sorted([first[0].address, added.address])
            assert all(w.healthy for w in backend.workers)
            removed = await asyncio.to_thread(launcher.remove_worker, "colocated")
            assert removed == added and not alive(added.pid)
            await sync_pools(backend, launcher, known)
            assert [w.client.address for w in backend.workers] == [first[0].address]
            assert await asyncio.to_thread(launcher.remove_worker, "prefill") is None
            await backend.stop()

        asyncio.run(scenario())
        # Stopped (Ctrl-C) while the planner adds a worker: the one still starting is stopped with
        # the rest and the add fails, instead of the worker joining a stopped cluster.
        with ThreadPoolExecutor(1) as pool:
            adding = pool.submit(launcher.add_worker, "colocated")
            probes.wait_for(lambda: len(_workers()) == 2, 30, "the new worker's process")
            started = _workers()
            launcher.stop()
            with pytest.raises(RuntimeError):
                adding.result(timeout=60)
            assert wait_gone(started, 10) == [] and launcher.workers() == []
    finally:
        launcher.stop()
    assert not alive(first[0].pid)


def _workers() -> list[int]:
    """This process's `pdserve serve` children."""
    return [p for p in descendants(os.getpid()) if "pdserve.cli" in cmdline(p)]



def test_transport_auto_is_shm_only_for_a_same_node_pair() -> None:
    from pdserve.transfer.pairing import advertised, pair_address

    assert advertised("auto") == "tcp" and advertised("shm") == "shm"
    assert pair_address("tcp://10.0.0.2:7000", "auto", "node-1", "node-1") == "shm://10.0.0.2:7000"
    assert pair_address("tcp://10.0.0.2:7000", "auto", "node-1", "node-2") == "tcp://10.0.0.2:7000"
    assert pair_address("tcp://10.0.0.2:7000", "auto", "node-1", "") == "tcp://10.0.0.2:7000"  # unknown: tcp
    assert pair_address("tcp://h:1", "tcp", "n", "n") == "tcp://h:1"  # an explicit transport is kept
    assert pair_address("shm://h:1", "shm", "a", "b") == "shm://h:1"


def test_readme_ray_example_is_a_valid_cluster() -> None:
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Running on a Ray cluster"):]
    section = section[:section.index("\n## ", 3)]
    cfg = cluster_from_dict(yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1)))
    assert cfg.launch.launcher == "ray" and cfg.launch.ray_bind_node_address  # multi-node needs it
    assert cfg.prefill.ray_resources.keys() != cfg.decode.ray_resources.keys()  # per-role placement
