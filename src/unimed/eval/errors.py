"""The error every evaluation task raises for data or settings it cannot evaluate."""


class EvalError(ValueError):
    """A dataset, split, class or label an evaluation needs is missing or unusable; the message
    names it. The command line prints it without a traceback."""
