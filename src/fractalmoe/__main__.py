"""``python -m fractalmoe`` (also what ``torchrun -m fractalmoe`` launches)."""

from .cli import console

console()
