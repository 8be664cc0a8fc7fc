"""The one exception type that means 'bad input or usage': the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input or usage. The message names the problem and the fix; the CLI exits with status 2."""

    exit_code = 2


class SymbolicShapeError(UserError):
    """A model that TVM cannot import or build while some of its input dims are symbolic, and that
    static input shapes may cure: a runtime then compiles it for each feed's shapes instead, and
    `compile` suggests --input-shape. Control flow keys on this type, never on a message's text."""
