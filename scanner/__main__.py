"""`python -m scanner` runs the felixscan command line."""

from scanner.app.cli import main

raise SystemExit(main())
