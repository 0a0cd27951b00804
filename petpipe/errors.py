"""The one exception type for mistakes a user can fix; the CLI prints its message, no traceback."""


class PetpipeError(Exception):
    """A problem with the user's data, params or environment, phrased as what to do about it."""
