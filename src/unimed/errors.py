"""The error of a setting that cannot be used, raised from any layer (a preset's key or value, or a
file a setting names: the phantom's sites and language packs, a lexicon), and one-line messages for
the files' read errors. The command line prints a ConfigError as one line, without a traceback."""


from pathlib import Path


class ConfigError(ValueError):
    """A configuration key or value that cannot be used, with the valid alternatives in the message."""


def yaml_problem(exc: Exception) -> str:
    """One line for a YAML (or other) read error: PyYAML's own message spans several lines."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{where}{getattr(exc, 'problem', None) or exc}"


def file_in_the_way(folder: Path) -> Path | None:
    """The file that stands where `folder` or a folder above it should be, if any."""
    return next((path for path in (folder, *folder.parents) if path.is_file()), None)


def why_unwritable(folder: Path, exc: OSError) -> str:
    """Why `folder` could not be made or written: the file standing where it or a folder above it
    should be (the OSError says only "File exists" or "Not a directory"), else the OSError's reason."""
    blocking = file_in_the_way(folder)
    return f"{blocking} is a file, not a folder" if blocking is not None else str(exc.strerror or exc)
