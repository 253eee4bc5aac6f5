"""The one exception type that the CLI turns into a one-line message (no traceback)."""


class PipelineError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix."""
