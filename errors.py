"""The one exception type users see: a clear, one-line message about bad input or an impossible request."""


class LeankError(Exception):
    """Bad input or an impossible request. The CLI prints the message on one line and exits non-zero."""


class SpecError(LeankError):
    """A malformed SPEC string (a cache policy such as `kivi2,recent=256`, a mask such as `freq:0.7`): a usage
    error, so the CLI exits 2 as for any other bad option value. A SPEC naming a file that cannot be read
    is a LeankError (exit 1), as for any other input file."""
