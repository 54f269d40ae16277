"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class WssError(Exception):
    """An error caused by the user's input (a file, a config, a command), not by a bug."""


class DataError(WssError):
    """A dataset file is missing, unreadable or malformed; the message names it."""
