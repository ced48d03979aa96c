"""The one exception type that reaches the user as a single clear line (CLI exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong flag, a checkpoint we cannot read.

    The message is one line that names the file or flag and says what to do; the CLI prints it
    as ``repa-probe: error: <message>`` and exits with status 2.
    """
