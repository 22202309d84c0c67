"""`python -m parsyn` is the `parsyn` command."""

from .cli import main

main()
