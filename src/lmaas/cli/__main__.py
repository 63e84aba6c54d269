"""``python -m lmaas.cli``: the same as the ``lmaas`` console script."""

from lmaas.cli.main import main

main()
