"""Downstream evaluation: one protocol for every method (DESIGN.md section 6).

Tasks register in :data:`unimed.eval.tasks.TASKS`; :func:`unimed.eval.runner.evaluate` runs them on
a list of :class:`unimed.eval.encoders.Encoder` and :mod:`unimed.eval.report` turns the metrics into
report.html.
"""
