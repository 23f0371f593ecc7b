"""The error of a setting that cannot be used, raised from any layer (a preset's key or value, or a
file a setting names: the phantom's sites and language packs, a lexicon), and one-line messages for
the files' read errors. The command line prints a ConfigError as one line, without a traceback."""


class ConfigError(ValueError):
    """A configuration key or value that cannot be used, with the valid alternatives in the message."""


def yaml_problem(exc: Exception) -> str:
    """One line for a YAML (or other) read error: PyYAML's own message spans several lines."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{where}{getattr(exc, 'problem', None) or exc}"
