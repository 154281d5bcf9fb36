"""User-facing errors: one line, actionable, no traceback at the CLI."""


class AttnswapError(Exception):
    """An error caused by user input (model, option, file). The CLI prints it on one line and exits 2."""

    exit_code = 2


class TrainingDiverged(AttnswapError):
    """A NaN/inf loss stopped training; the last good checkpoint is left intact."""

    exit_code = 3


def did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
