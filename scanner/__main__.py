"""`python -m scanner` runs the felixscan command line."""

from scanner.cli import main

raise SystemExit(main())
