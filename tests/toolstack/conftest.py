"""The toolstack's integration tests use the suite's real stack (``rundir``, ``stack`` and
``xl``: ``xl-sim --json`` run as the separate process it is) from ``tests/conftest.py``."""
