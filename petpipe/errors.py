"""The one exception type for mistakes a user can fix; the CLI prints its message, no traceback."""


class PetpipeError(Exception):
    """A problem with the user's data, params or environment, phrased as what to do about it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a stage, with what was kept: the CLI prints it in one line and exits 130."""
