"""The I/O side of the daemon: the trio shell (:mod:`.daemon`: listeners, guest sockets,
routing; :mod:`.poller`: the main loop; :mod:`.connection`: each connection's task) and the
socket work every request takes (:mod:`.conn_io`, which imports no trio and is compiled with
the core).  Nothing is imported here, so that :mod:`.conn_io` stays free of trio."""
