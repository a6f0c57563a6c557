"""The one exception type users see: a clear, one-line message about bad input or an impossible request."""


class LeankError(Exception):
    """Bad input or an impossible request. The CLI prints the message on one line and exits non-zero."""
