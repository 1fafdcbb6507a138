"""``python -m flatpeft`` (and ``torchrun -m flatpeft``): the ``flatpeft`` command line."""

from .cli import run

run()
