"""``python -m unimp ...`` is the ``unimp`` command."""

from unimp.cli import main

raise SystemExit(main())
