"""The one exception type a user sees: a message naming the field or file to fix."""


class UserError(Exception):
    """Bad input that the user can fix. The CLI prints it on one line and exits 2."""
