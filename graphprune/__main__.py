"""``python -m graphprune``: the same as the ``graphprune`` command."""

from graphprune.cli.commands import main

raise SystemExit(main())
