"""The one exception type that means 'bad input or usage': the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input or usage. The message names the problem and the fix; the CLI exits with status 2."""

    exit_code = 2


class SymbolicShapeError(UserError):
    """A model that TVM cannot import or build while some of its input dims are symbolic, and that
    static input shapes may cure: a runtime then compiles it for each feed's shapes instead, and
    `compile` suggests --input-shape. Control flow keys on this type, never on a message's text."""


def first_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, at most `limit` characters; its type's name where
    the message is empty. The one place a message is cut to a line (a backend's multi-line C++
    dump must not reach a user's one-line error)."""
    text = str(e).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(e).__name__


def describe(e: BaseException, limit: int = 240) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {first_line(e, limit)}"
