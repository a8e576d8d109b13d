"""``python -m stagewise.cli``: the ``stagewise`` command."""

from stagewise.cli.main import main

main()
