"""User-facing errors: one line, actionable, no traceback at the CLI.

Exit codes: 0 ok, 1 internal error (a bug: traceback), 2 bad input, 3 non-finite numbers (training diverged,
an evaluation gave NaN/inf), 4 could not write (disk full, permissions), 130 interrupted (Ctrl-C).
"""


class AttnswapError(Exception):
    """An error caused by user input (model, option, file). The CLI prints it on one line and exits 2."""

    exit_code = 2


class OutputExists(AttnswapError):
    """The output directory exists (or appeared while working) and --force was not given."""


class NumericalError(AttnswapError):
    """A computation gave non-finite numbers (NaN/inf): nothing was saved from it."""

    exit_code = 3


class TrainingDiverged(NumericalError):
    """A NaN/inf loss or gradient stopped training; the last good checkpoint is left intact."""


class WriteError(AttnswapError):
    """Writing an output failed (disk full, permissions); the old output is intact, the partial one removed."""

    exit_code = 4


def did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_validation_error(error) -> tuple[tuple, str, object]:
    """(location, message, input) of a pydantic ValidationError's first error, the one every caller reports
    on one line ("Value error, " dropped from messages raised by validators)."""
    err = error.errors()[0]
    return tuple(err["loc"]), err["msg"].removeprefix("Value error, "), err.get("input")
