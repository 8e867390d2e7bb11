"""The one exception a user's mistake raises."""


class ItermergeError(Exception):
    """A user's mistake: the message names the value, the place and the fix."""
