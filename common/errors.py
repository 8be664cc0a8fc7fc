"""The one exception type that means 'bad input or usage': the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input or usage. The message names the problem and the fix; the CLI exits with status 2."""

    exit_code = 2
