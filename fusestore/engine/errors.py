"""The errors a user sees as one line: every command catches `FusestoreError` once, at the top
(`cli.main`), and prints its message; anything else is a bug and keeps its traceback."""


class FusestoreError(Exception):
    """A failure the user can act on; the message says what and where, on one line."""
