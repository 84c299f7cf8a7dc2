"""CLI flags generated from the schema: each setting's flag, type, default and help come from there.

Naming: a setting's flag is its key with dashes (`--max-inflight`, `--block-size`); the role
sections' settings carry the role in front where a command has several roles (`pdserve up
--decode-max-batch-size 32`) and not where it runs one (`pdserve serve --role decode
--max-batch-size 32`). Flags are only *overrides*: a flag that is not given leaves the file's value
(or the schema's default), so `--config cluster.yaml --decode 2` changes exactly one setting.
"""

import argparse
import typing
from typing import Any, Literal

from pdserve.config.load import cluster_from_dict, convert, merge, read_file
from pdserve.config.schema import (
    ROLES,
    SECTIONS,
    ClusterConfig,
    ConfigError,
    DecodeConfig,
    ListenConfig,
    PrefillConfig,
    SchedulerConfig,
    Section,
    settings,
)

DEST = "cfg:"  # argparse dests of generated flags: "cfg:decode.max_batch_size", "cfg:@role.max_num_seqs"
ROLE = "@role"
# Shorter or older names users type, beside the generated ones.
ALIASES: dict[str, tuple[str, ...]] = {
    "prefill.workers": ("--prefill",), "decode.workers": ("--decode",), "colocated.workers": ("--colocated",),
}
# Where the field name alone would be unclear on a command line.
FLAG_NAMES = {"transfer.timeout_s": "--transfer-timeout-s", "planner.mode": "--planner",
              "planner.slo_ttft_ms": "--slo-ttft-ms", "planner.slo_tpot_ms": "--slo-tpot-ms"}
PREFIXED = (*ROLES, "planner")  # sections whose flags carry the section's name in front
ROLE_POLICIES: dict[str, type[Section]] = {"prefill": PrefillConfig, "decode": DecodeConfig,
                                           "colocated": SchedulerConfig}


def _shown(v: Any) -> str:
    if v == "" or v == [] or v == {}:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _float_map(s: str) -> dict[str, float]:
    """`node_a=1,GPU=0.5` -> {"node_a": 1.0, "GPU": 0.5}."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in s.split(","))):
        key, _, value = (p.strip() for p in item.partition("="))
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER,..., got {s!r}") from None
        if not key:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER,..., got {s!r}")
    return out


def _add(g: argparse._ArgumentGroup, key: str, name: str, tp: Any, help_text: str, default_text: str,
         flag: str) -> None:
    opts = [FLAG_NAMES.get(key, flag), *ALIASES.get(key, ())]
    kw: dict[str, Any] = {"dest": DEST + key, "default": argparse.SUPPRESS,
                          "help": f"{help_text} (default: {default_text})"}
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        kw.update(choices=choices, type=type(choices[-1]))
        if "" in choices:
            kw["choices"] = [c for c in choices if c != ""]
    elif typing.get_origin(tp) is list:
        kw.update(type=_int_list, metavar="N,N,...")
    elif typing.get_origin(tp) is dict:
        kw.update(type=_float_map, metavar="NAME=X,...")
    else:
        kw.update(type=tp, metavar={int: "N", float: "X"}.get(tp, "TEXT"))
    g.add_argument(*opts, **kw)


def add_section(p: argparse.ArgumentParser, cls: type[Section], section: str, prefix: str = "",
                skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """One flag per setting of cls; dest `cfg:<section>.<name>` (`cfg:<name>` at the top level)."""
    g = p.add_argument_group(title or f"{section or 'worker'} settings ({(cls.__doc__ or '').strip().rstrip('.')})")
    for name, tp, default, help_text in settings(cls):
        key = f"{section}.{name}" if section else name
        if key in skip:
            continue
        _add(g, key, name, tp, help_text, _shown(default), f"--{prefix}{name.replace('_', '-')}")


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="cluster YAML (see `pdserve config`); flags override it (default: none)")


def add_cluster_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every setting of a cluster (`pdserve up`, `pdserve sim`), the role sections' with a role prefix."""
    add_config_flag(p)
    add_section(p, ClusterConfig, "", skip=skip)
    for section, cls in SECTIONS.items():
        add_section(p, cls, section, f"{section}-" if section in PREFIXED else "", skip)


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The settings of one worker (`pdserve serve --role R`): its role's policy without a prefix."""
    add_config_flag(p)
    add_section(p, ListenConfig, "listen", title="HTTP listen address")
    add_section(p, ClusterConfig, "")
    add_section(p, SECTIONS["cache"], "cache")
    add_section(p, SECTIONS["transfer"], "transfer")
    g = p.add_argument_group("role policy (the settings of the chosen --role; the same keys as its cluster section)")
    seen: dict[str, tuple[Any, list[str], list[str]]] = {}
    for role, cls in ROLE_POLICIES.items():
        for name, tp, default, help_text in settings(cls):
            _, helps, defaults = seen.setdefault(name, (tp, [], []))
            helps.append(f"{role}: {help_text}")
            defaults.append(f"{role} {_shown(default)}")
    for name, (tp, helps, defaults) in seen.items():
        _add(g, f"{ROLE}.{name}", name, tp, "; ".join(helps), ", ".join(defaults), f"--{name.replace('_', '-')}")


def add_router_flags(p: argparse.ArgumentParser) -> None:
    """The router's settings (`pdserve router`): the model's name and the router section."""
    add_config_flag(p)
    add_section(p, ClusterConfig, "", skip=("dtype", "device", "threads", "seed", "max_waiting"))
    add_section(p, SECTIONS["router"], "router")


def overrides(args: argparse.Namespace, role: str | None = None) -> dict[str, Any]:
    """The settings given as flags, nested like the cluster file."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(DEST):
            continue
        path = dest[len(DEST):].split(".")
        if path[0] == ROLE:
            assert role is not None, "role flags need a role"
            names = {n for n, *_ in settings(ROLE_POLICIES[role])}
            if path[1] not in names:
                raise ConfigError(f"--{path[1].replace('_', '-')}: not a setting of the {role} role")
            path[0] = role
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def cluster_from_args(args: argparse.Namespace, role: str | None = None,
                      extra: dict[str, Any] | None = None) -> ClusterConfig:
    """`--config` (if given), then `extra`, then the flags on top; validated."""
    given = overrides(args, role)
    given.pop("listen", None)
    base = read_file(args.config) if getattr(args, "config", None) else {}
    return cluster_from_dict(merge(merge(base, extra or {}), given))


def listen_from_args(args: argparse.Namespace) -> ListenConfig:
    """`pdserve serve`'s HTTP (or RPC) listen address."""
    return convert(overrides(args, getattr(args, "role", None)).get("listen", {}), ListenConfig)
