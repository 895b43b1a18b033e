"""Errors that lrk reports to the user as one clear message (no traceback)."""


class LrkConfigError(ValueError):
    """Bad user input (config value, path, data, rank): raised before any training starts.

    The message names the bad value and what would be valid, e.g.
    ``data.image_size=0 is invalid: it must be a positive integer``.
    """
