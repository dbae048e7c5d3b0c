"""The one error type users see.

Anything a user can get wrong (a missing file, a corrupt checkpoint, mismatched image sizes, a bad
parameter) raises `JPQError` with a message that says what was wrong and what to do. The CLI prints it as
one line and exits with status 2; the app shows it with `st.error`. Any other exception is a bug.
"""


class JPQError(Exception):
    """A problem with the user's input, explained in the message."""
