"""Shared edge code for the absl launchers: clear errors with a nonzero exit."""
import sys

from absl import flags, logging

USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               FloatingPointError)


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
