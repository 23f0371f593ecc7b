"""Input checks shared by the text stages: report corpora must be strings and not all blank."""

from __future__ import annotations

from collections.abc import Sequence


def require_texts(reports: Sequence[str], name: str) -> list[str]:
    """The reports as a list, or a ValueError naming the argument and the first bad row."""
    texts = list(reports)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}] is a {type(text).__name__}, expected a report string")
    if not any(text.strip() for text in texts):
        raise ValueError(f"{name} is empty: at least one non-blank report is needed")
    return texts
