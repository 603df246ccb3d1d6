"""The one error type that means "the user gave us bad input".

The CLI turns it into a single `error: ...` line and exit code 2; anything else is a bug and keeps
its traceback.
"""


class UserInputError(Exception):
    """Bad input from the user: a wrong name, path, key or value. Message is one line."""
