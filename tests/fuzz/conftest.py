"""The process-level fuzz tests use the suite's real stack (``rundir`` and ``stack``) from
``tests/conftest.py``."""
