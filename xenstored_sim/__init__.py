"""xenstored-sim: a xenstore daemon that speaks the real wire protocol."""

from .compiled import install

# The mypyc-compiled core, when a build matching the sources exists (compiled.py).
install()
