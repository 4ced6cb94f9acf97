"""``python -m graphprune``: the same as the ``graphprune`` command."""

from graphprune.cli import main

raise SystemExit(main())
