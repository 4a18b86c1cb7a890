"""pgbctl: create, run, test and tear down an astronomical alert broker."""

__version__ = "0.1.0"
