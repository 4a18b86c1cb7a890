"""``python -m pgbctl`` = the ``pgbctl`` command."""

from pgbctl.cli.main import main

main()
