"""``python -m attnmap``: the same as the ``attnmap-render`` console script."""

from attnmap.cli import main

main()
