"""``python -m edgesmith`` is the ``edgesmith`` command."""

from edgesmith.cli.app import main

main()
