"""unimed: medical vision-language pre-training with an embedded phantom world."""

__version__ = "0.1.0"
