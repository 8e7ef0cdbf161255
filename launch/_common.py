"""Shared edge code for the absl launchers: clear errors with a nonzero exit."""
import os
import sys

# NumPy's BLAS threads spin between calls and starve MuJoCo's stepping threads: the batched
# collector ran at a third of its speed with them (benchmarks/collect.py). One BLAS thread; set
# before NumPy is first imported (the launchers import this module first).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import flags, logging

USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               FloatingPointError)


def enable_compile_cache() -> str:
    """XLA's persistent compilation cache, on by default for every launcher: `$MDT_JAX_CACHE`, else
    `~/.cache/mdt_jax/xla`, unless a cache directory is set already (JAX_COMPILATION_CACHE_DIR or
    jax.config). Every program is cached, however quick its compile, so a second process running
    the same shapes compiles nothing. Returns the directory in use."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        path = os.environ.get("MDT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mdt_jax", "xla")
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax.config.jax_compilation_cache_dir


def run_or_exit(fn, *args, **kwargs):
    """Call fn; a user-facing error prints `error: ...` to stderr and exits with status 2.

    Library INFO logs (orbax) are hidden unless --verbosity is given.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        logging.debug("user error", exc_info=True)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        sys.exit(2)


def config_app(default_config: str, fn, workdir_help: str, *, lock_beside: bool = False):
    """Define --config (an ml_collections config file, locked) and --workdir; return an absl main
    that calls `fn(config, workdir)` under `fileio.workdir_lock(workdir)` and prints its result.

    The lock keeps a second run out of a workdir in use (it exits 2 naming the holder's pid,
    writing nothing). It is `workdir/.lock`, the workdir created for it when missing (every
    target creates its workdir anyway; a failed run's empty one is removed again). With
    `lock_beside` it is the sibling `.<workdir>.lock` instead, for targets whose output folder
    must not exist or be empty when they start (fisher, gram). On a multi-host launch, only
    process 0 takes it."""
    from absl import app
    from ml_collections import config_flags

    try:  # ml_collections applies --config.x=y overrides to the default config here
        config = config_flags.DEFINE_config_file("config", default_config,
                                                 "Config file; its docstring gives the command.", lock_config=True)
    except (AttributeError, KeyError) as e:
        _unknown_field(e, default_config)
    workdir = flags.DEFINE_string("workdir", None, workdir_help, required=True)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from mdt_jax.sharding import initialize_distributed

        distributed = initialize_distributed()  # multi-host when launched so (see README), else nothing
        enable_compile_cache()
        import mdt_jax.behaviour.datasets  # noqa: F401  registers the `generated:` dataset resolver
        print(run_or_exit(locked, fn, config.value, workdir.value, lock=not distributed or _process_index() == 0,
                          beside=lock_beside))

    return main


def locked(fn, config, workdir: str, *, lock: bool = True, beside: bool = False):
    """fn(config, workdir) holding the workdir's lock (`mdt_jax.fileio.workdir_lock`) if `lock`."""
    import contextlib

    from mdt_jax.fileio import workdir_lock

    with workdir_lock(workdir, beside=beside) if lock else contextlib.nullcontext():
        return fn(config, workdir)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _unknown_field(e: Exception, config_file: str):
    msg = str(e.args[0] if e.args else e).strip("\"'")
    given = [a.split("=")[0][2:] for a in sys.argv[1:] if a.startswith("--config.") and msg in a]
    print(f"error: unknown config field {given[0] if given else msg!r} (the fields are in {config_file})",
          file=sys.stderr)
    sys.exit(2)


def run_app(main):
    """absl's app.run, after parsing the flags once up front so that a bad override of an
    explicitly given --config file is a one-line error (exit 2), not a traceback."""
    from absl import app

    try:
        argv = flags.FLAGS(sys.argv)
    except (AttributeError, KeyError) as e:
        _unknown_field(e, "the --config file")
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main, flags_parser=lambda _: argv)
