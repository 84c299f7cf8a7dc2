"""One schema for every setting: files, generated flags, `up`, `serve`, `router`, the simulator, the README."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdserve.cli import build_parser
from pdserve.config.flags import cluster_from_args
from pdserve.config.load import cluster_from_dict, load_cluster_file, to_dict
from pdserve.config.schema import SECTIONS, ClusterConfig, ConfigError, DecodeConfig, reference_yaml, settings
from pdserve.launch.local import worker_settings
from pdserve.serve.engine_args import parse_settings
from pdserve.sim.build import build_instances
from pdserve.sim.commands import sim_config
from tests.servers import running_server

REPO = Path(__file__).resolve().parent.parent
# Non-default values in every policy section (and the cache), as a user's cluster file would set them.
CUSTOM = """\
model: llama-3.1-8b
cache: {block_size: 32, num_blocks: 700, eviction: fifo, enable_prefix_caching: false}
prefill: {workers: 2, max_batch_tokens: 4096, max_wait_ms: 7, max_num_seqs: 96, target_utilization: 0.6,
          length_buckets: [256, 1024], min_batch_scale: 0.5}
decode: {workers: 3, max_batch_size: 24, max_num_seqs: 40, max_num_batched_tokens: 300, adaptive_batch: true,
         tpot_target_ms: 12, min_batch_size: 4, reservation_timeout_s: 9}
colocated: {max_num_batched_tokens: 700, max_num_seqs: 33, enable_chunked_prefill: false}
transfer: {transport: shm, timeout_s: 7}
router: {disagg_threshold: 64, breaker_failures: 5, max_attempts: 2}
"""


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _keys(cls: type = ClusterConfig, prefix: str = "") -> set[str]:
    out = {prefix + name for name, *_ in settings(cls)}
    if cls is ClusterConfig:
        for section, sub in SECTIONS.items():
            out |= _keys(sub, f"{section}.")
    return out


@pytest.mark.parametrize(("data", "message"), [
    ({"decode": {"max_batch_sz": 1}}, "decode.max_batch_sz: unknown key"),
    ({"routr": {}}, "routr: unknown key"),
    ({"decode": {"max_batch_size": 0}}, "decode.max_batch_size: expected `int` >= 1"),
    ({"decode": {"max_batch_size": 64, "max_num_seqs": 8}}, "decode.max_num_seqs: must be >= max_batch_size"),
    ({"cache": {"eviction": "random"}}, "cache.eviction: must be one of lru, fifo"),
    ({"prefill": {"max_wait_ms": "soon"}}, "prefill.max_wait_ms: expected `float`, got `str`"),
    ({"router": {"port": 70000}}, "router.port: expected `int` <= 65535"),
    ({"prefill": {"workers": 1}, "decode": {"workers": 0}}, "decode.workers: prefill workers need"),
])
def test_bad_keys_and_values_are_named(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        cluster_from_dict(data)
    assert str(e.value).startswith(message)


def test_direct_construction_checks_the_same_bounds() -> None:
    with pytest.raises(ConfigError, match="max_batch_size: must be >= 1"):
        DecodeConfig(max_batch_size=0)


def test_file_round_trips_and_flags_override_it(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text(CUSTOM)
    cfg = load_cluster_file(f)
    assert cluster_from_dict(to_dict(cfg)) == cfg
    got = cluster_from_args(_parse("up", "--config", str(f), "--decode", "5", "--decode-max-batch-size", "30",
                                   "--eviction", "lru", "--breaker-reset-s", "1.5", "--no-decode-adaptive-batch"))
    assert (got.decode.workers, got.decode.max_batch_size, got.decode.adaptive_batch) == (5, 30, False)
    assert got.cache.eviction == "lru" and got.router.breaker_reset_s == 1.5
    assert got.decode.max_num_seqs == 40 and got.prefill == cfg.prefill  # untouched keys keep the file's value


def test_every_setting_reaches_up_and_every_up_flag_is_a_setting() -> None:
    """`pdserve up` can set everything a file can (eviction, prefix caching, max_waiting, breakers...)."""
    up = build_parser()._subparsers._group_actions[0].choices["up"]  # type: ignore[union-attr]
    dests = {a.dest[len("cfg:"):] for a in up._actions if a.dest.startswith("cfg:")}
    assert dests == _keys()


def test_sim_and_up_read_identical_policy_settings(tmp_path: Path) -> None:
    """`pdserve sim --config F` runs the policies a worker of `pdserve up --config F` runs."""
    f = tmp_path / "cluster.yaml"
    f.write_text(CUSTOM)
    up = cluster_from_args(_parse("up", "--config", str(f)))
    sim = build_instances(sim_config(_parse("sim", "--config", str(f), "--tp", "1")))
    # What each worker of that `up` reads: the settings file it is given, parsed by `pdserve serve`.
    settings_file = tmp_path / "workers.json"
    settings_file.write_text(json.dumps(worker_settings(up)))
    worker = {}
    for role in ("prefill", "decode", "colocated"):
        args = _parse("serve", "--config", str(settings_file), "--role", role, "--internal", "--port", "1")
        parse_settings(args)
        worker[role] = args.cluster
    assert [i.role for i in sim] == ["prefill"] * 2 + ["decode"] * 3
    for inst in sim:
        policy_cfg = inst.policy.config if inst.role == "prefill" else inst.policy.decode_config
        assert policy_cfg == worker[inst.role].role(inst.role).policy() == up.role(inst.role).policy()
        assert inst.policy.block_manager.block_size == worker[inst.role].cache.block_size == 32
        assert inst.policy.block_manager.num_blocks == up.cache.num_blocks == 700
    colocated = build_instances(sim_config(_parse("sim", "--config", str(f), "--mode", "colocated")))
    assert colocated[0].policy.config == worker["colocated"].colocated.policy() == up.colocated.policy()
    assert worker["decode"].transfer == up.transfer and worker["decode"].transfer.timeout_s == 7


def test_sim_defaults_are_the_real_defaults() -> None:
    sim = build_instances(sim_config(_parse("sim", "--model", "llama-3.1-8b")))
    real = ClusterConfig()
    assert sim[0].policy.config == real.prefill.policy() and sim[1].policy.decode_config == real.decode.policy()


def test_role_flags_of_serve_apply_to_its_role() -> None:
    args = _parse("serve", "--role", "decode", "--max-batch-size", "16", "--max-num-seqs", "32", "--port", "9")
    parse_settings(args)
    assert (args.cluster.decode.max_batch_size, args.cluster.decode.max_num_seqs, args.port) == (16, 32, 9)
    args = _parse("serve", "--role", "decode", "--max-wait-ms", "3")
    with pytest.raises(ConfigError, match="--max-wait-ms: not a setting of the decode role"):
        parse_settings(args)


def _reference_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Configuring a cluster"):]
    m = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert m, "the README's 'Configuring a cluster' section has no yaml block"
    return m.group(1)


def test_readme_reference_is_the_schema() -> None:
    """The README's YAML reference is `pdserve config`'s output: every key, default and help."""
    assert _reference_block() == reference_yaml(), "regenerate it: pdserve config"
    documented = {line.split(":")[0].strip() for line in reference_yaml().splitlines()}
    assert {k.split(".")[-1] for k in _keys()} <= documented


def _walk(p: argparse.ArgumentParser, name: str):  # type: ignore[no-untyped-def]
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from _walk(sp, f"{name} {sub}")


def test_every_help_option_has_a_description_and_its_default() -> None:
    for name, p in _walk(build_parser(), "pdserve"):
        text = p.format_help()
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"{name} {a.option_strings[0]}: no help"
        options = [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        assert text.count("(default:") >= len(options), f"{name}: an option does not show its default"


def test_up_and_serve_help_come_from_the_schema() -> None:
    up, serve = _cli("up", "--help"), _cli("serve", "--help")
    assert up.returncode == serve.returncode == 0
    for key in ("--decode-max-batch-size", "--eviction", "--max-waiting", "--breaker-failures",
                "--served-model-name", "--transfer-timeout-s", "--colocated-max-num-seqs"):
        assert key in up.stdout
    assert "sequences decoded per step (default: 64)" in " ".join(up.stdout.split())
    for key in ("--max-batch-size", "--max-wait-ms", "--eviction", "--max-waiting", "--served-model-name"):
        assert key in serve.stdout


@pytest.mark.parametrize("argv", [
    ["sim", "--model", "llama-3-70b", "--num-requests", "5"],  # does not fit on one H100: was a traceback
    ["sim", "--gpu", "h99"],
    ["sim", "--model", "no-such-model"],
    ["sim", "--trace", "/no/such/trace.csv"],
    ["up", "--decode", "two"],
    ["up", "--decode-max-batch-sz", "8"],
    ["up", "--model", "no-such-model"],
    ["serve", "--role", "decode", "--max-wait-ms", "5"],
    ["kv-size", "--model", "no-such-model"],
])
def test_user_errors_are_one_line_and_exit_2(argv: list[str]) -> None:
    r = _cli(*argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"pdserve {argv[0]}: ")


def test_bad_cluster_file_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text("decode: {max_batch_sz: 8}\n")
    r = _cli("up", "--config", str(f))
    assert r.returncode == 2 and r.stderr.startswith("pdserve up: decode.max_batch_sz: unknown key")


def _models_and_complete(url: str, name: str) -> tuple[list[str], int]:
    ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
    r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": [5, 6, 7], "max_tokens": 2}, timeout=60)
    return ids, r.status_code


def test_served_model_name_serve() -> None:
    with running_server(["serve", "--role", "colocated", "--model", "demo", "--threads", "1",
                         "--served-model-name", "acme/demo-1"]) as srv:
        assert _models_and_complete(srv.url, "acme/demo-1") == (["acme/demo-1"], 200)
        assert _models_and_complete(srv.url, "demo")[1] != 200  # the folder/catalog name is not the id


def test_served_model_name_up() -> None:
    """Through `up` (settings file to the workers, name to the router)."""
    with running_server(["up", "--model", "demo", "--threads", "1", "--port", "0", "--prefill", "0", "--decode", "0",
                         "--colocated", "1", "--served-model-name", "acme/demo-1"], port_flag=None,
                        url_pattern=r"serving \S+ at (http://[\d.:]+)", timeout=240) as srv:
        assert _models_and_complete(srv.url, "acme/demo-1") == (["acme/demo-1"], 200)


def test_router_reads_the_router_section_and_its_name(tmp_path: Path) -> None:
    from pdserve.serve.commands import router_config

    f = tmp_path / "cluster.yaml"
    f.write_text(CUSTOM)
    cfg = router_config(_parse("router", "--config", str(f), "--prefill", "a:1", "--decode", "b:2,c:3",
                               "--served-model-name", "acme/x", "--max-attempts", "3"))
    assert (cfg.router.breaker_failures, cfg.router.max_attempts, cfg.router.disagg_threshold) == (5, 3, 64)
    assert (cfg.prefill.workers, cfg.decode.workers, cfg.public_model_name) == (1, 2, "acme/x")


def test_sim_command_with_config(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text(CUSTOM)
    out = tmp_path / "sim.json"
    r = _cli("sim", "--config", str(f), "--num-requests", "20", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "2x prefill h100 TP1 + 3x decode h100 TP1" in r.stdout
    cluster = json.loads(out.read_text())["cluster"]["cluster"]
    assert cluster == to_dict(load_cluster_file(f))


def test_config_command_prints_the_resolved_cluster(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text(CUSTOM)
    r = _cli("config", "--config", str(f), "--decode", "4")
    assert r.returncode == 0, r.stderr
    import yaml

    assert yaml.safe_load(r.stdout) == to_dict(cluster_from_dict({**yaml.safe_load(CUSTOM),
                                                                  "decode": {**yaml.safe_load(CUSTOM)["decode"],
                                                                             "workers": 4}}))


def test_offline_llm_takes_the_schema_settings() -> None:
    from pdserve.engine.llm import _config

    cfg = _config("demo", {"block_size": 4, "max_num_seqs": 3, "dtype": None, "device": "cpu"})
    assert (cfg.cache.block_size, cfg.colocated.max_num_seqs, cfg.dtype) == (4, 3, "")
    assert cfg.cache.kv_cache_memory_gb == ClusterConfig().cache.kv_cache_memory_gb
    with pytest.raises(ConfigError, match="max_batch_sz: unknown setting"):
        _config("demo", {"max_batch_sz": 4})
