"""Evaluation: offline tasks and scorers (`tasks`), generated code run in `parsyn.tools.sandbox`, the harness
that runs every method on the same branches (`run`), and the HTML report (`report`)."""
