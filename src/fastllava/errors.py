"""The one exception type for mistakes a user can fix (bad path, bad image, bad option).

The CLI prints its message on one line and exits with code 2; everything else is a bug.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""
