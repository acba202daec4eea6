"""``python -m mrl`` is the ``mrl`` command."""

from mrl.cli import main

raise SystemExit(main())
