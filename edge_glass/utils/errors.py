"""The one exception type for mistakes a user can fix.

Scripts catch `UserError` at the top and print its message as a single line, without a
traceback: a typo in a config or a missing directory is not a bug in Edge Glass, and a
40-line traceback hides the one line that says what to change. Anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input (config, paths, data) with a message that says how to fix it."""


class AgreedError(UserError):
    """A `UserError` every rank of a distributed run raises alike (they agreed on it through a
    collective): only rank 0 prints it, so the user reads one line, not one per rank."""
