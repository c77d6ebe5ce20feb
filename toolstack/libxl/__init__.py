"""Domain operations: the trio shell of the toolstack, split along libxl's own files.

``async with open_libxl(rundir, command="create") as lx:`` connects to xenstored-sim and
hypervisor-sim; :class:`Libxl` then creates, lists, pauses, saves, restores and destroys
domains, spawning ``qemu-model`` as the device model and speaking QMP to it.  Every xenstore,
hypervisor, QMP and process action goes through :class:`toolstack.session.Session` and is
written to ``RUNDIR/audit/toolstack.jsonl`` (:mod:`toolstack.audit`).

The modules follow tools/libs/light: :mod:`.dom` (libxl_dom.c), :mod:`.dm` (libxl_dm.c),
:mod:`.domain` (libxl_domain.c), :mod:`.create` (libxl_create.c), :mod:`.dom_save`
(libxl_dom_save.c, libxl_stream_write.c) and :mod:`.stream_read` (libxl_stream_read.c).

Failures raise :class:`ToolstackError` with a message meant for the user; a create or restore
that fails part-way undoes everything it made before the error is raised.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from hypervisor_sim.client import open_hypervisor
from xenstored_sim.client import open_xenstore

from ..audit import Audit
from ..session import DeviceModelError, RunDir, ToolstackError, rundir_from
from .dm import DM_START_TIMEOUT
from .dom_save import Save
from .results import CreateResult, DomainSummary, RestoreResult, SaveResult
from .stream_read import Restore

__all__ = [
    "DM_START_TIMEOUT",
    "CreateResult",
    "DeviceModelError",
    "DomainSummary",
    "Libxl",
    "RestoreResult",
    "RunDir",
    "SaveResult",
    "ToolstackError",
    "open_libxl",
    "rundir_from",
]


class Libxl(Restore, Save):
    """The toolstack's domain operations over one xenstore and one hypervisor connection."""


@asynccontextmanager
async def open_libxl(
    rundir: str | os.PathLike[str], *, command: str = "api"
) -> AsyncIterator[Libxl]:
    """Connect to the daemons of ``rundir``; ``command`` names the caller in the audit log."""
    run = rundir_from(rundir)
    async with AsyncExitStack() as stack:
        audit = Audit(run.root, command)
        stack.callback(audit.close)
        try:
            hv = await stack.enter_async_context(open_hypervisor(run.hypervisor_socket))
        except OSError as exc:
            raise ToolstackError(
                f"cannot reach hypervisor-sim at {run.hypervisor_socket}: {exc.strerror or exc}"
            ) from None
        try:
            xs = await stack.enter_async_context(open_xenstore(run.xenstore_socket))
        except OSError as exc:
            raise ToolstackError(
                f"cannot reach xenstored-sim at {run.xenstore_socket}: {exc.strerror or exc}"
            ) from None
        yield Libxl(run, xs, hv, audit)
