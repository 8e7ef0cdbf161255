"""The ConfigDict a launcher builds from its flags, for calling its library entry in-process."""
import importlib

import ml_collections


def config_from_args(args: list[str], default: str = "") -> ml_collections.ConfigDict:
    """`--config=FILE` (else `default`) and its `--config.a.b=VALUE` overrides, parsed to the type
    of the field they override, as ml_collections' config flags do; other arguments are ignored."""
    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    path = (files or [default])[0]
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config()
    for a in args:
        if not a.startswith("--config."):
            continue
        key, value = a[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        old = node[leaf]
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--config.{key}: not a bool: {value!r}")
            node[leaf] = value.lower() in ("true", "1")
        elif isinstance(old, (int, float)):
            node[leaf] = type(old)(value)
        elif isinstance(old, tuple):  # the configs' lists: `--config.tasks=a,b` as the real flag parses it
            from ml_collections.config_flags.tuple_parser import TupleParser
            node[leaf] = TupleParser().parse(value)
        else:
            node[leaf] = value
    return config
