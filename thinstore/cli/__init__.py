"""The ``thinstore`` command line: one module per command group, listed in main.COMMANDS."""
