"""The one exception type of repopt.data."""


class DataError(ValueError):
    """A dataset could not be found, read or trusted; the message names the file or directory."""
