"""The one exception type that means "the user asked for something we cannot do".

CLIs catch it and print its message as a single line; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (paths, config values, files), not a bug."""
