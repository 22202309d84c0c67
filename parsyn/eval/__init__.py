"""Evaluation: offline tasks and scorers (`tasks`), a sandbox for generated code (`sandbox`), the harness
that runs every method on the same branches (`run`), and the HTML report (`report`)."""
