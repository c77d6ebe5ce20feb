"""Fixtures of the security tests: a daemon with an audit log and introduced guests 1 and 2."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from xenstored_sim.wire import Op


@pytest.fixture
def xsd(start_daemon: Callable[..., Any]) -> Callable[..., Any]:
    """``xsd(*flags)``: a daemon with an audit log whose ``priv`` connection has introduced
    domains 1 and 2."""

    def start(*args: str) -> Any:
        d = start_daemon(*args, audit=True)
        priv = d.conn()
        for domid in (1, 2):
            assert priv.req(Op.INTRODUCE, b"%d\x001\x001\0" % domid) == b"OK\0"
        d.priv = priv
        return d

    return start
