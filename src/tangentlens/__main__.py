"""``python -m tangentlens`` runs the command-line interface (``tangentlens demo``, ...)."""

from .cli import main

raise SystemExit(main())
