"""The one exception type that the command line turns into a one-line message and exit code 2."""


class CadisError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Raised for bad configuration values, missing data or models and similar; the CLI prints
    ``cadis: error: <message>`` and exits with :data:`EXIT_USAGE` instead of a traceback.
    """


class RepeatedFailure(CadisError):
    """Work refused without being tried again: an earlier attempt failed with a CadisError,
    which a retry cannot change. The message is that attempt's reason."""


EXIT_USAGE = 2


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a
    library's multi-line error folded into a :class:`CadisError`'s one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
