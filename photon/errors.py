"""The one exception type for mistakes a user can fix (bad config, missing data, wrong checkpoint).

The CLI prints a `UserError` as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input, stated as what is wrong and how to fix it."""
