"""The one exception type the CLI turns into a single line on stderr."""


class SdloraError(Exception):
    """Bad input or an unmet precondition the user can fix: shown as one line, never a traceback."""
