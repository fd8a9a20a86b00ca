"""``python -m peftlab``: the same as the ``peftlab`` command."""

from peftlab.cli import main

main()
