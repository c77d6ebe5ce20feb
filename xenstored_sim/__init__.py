"""xenstored-sim: a xenstore daemon that speaks the real wire protocol."""
