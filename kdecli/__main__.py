"""``python -m kdecli``: the same as the ``kdecli`` command."""

from kdecli.entry import main

main()
