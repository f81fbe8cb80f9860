"""`python -m mailer` is the same as the `mailer` command."""

from mailer.cli import main

main()
