"""Every package dispatches by a table built at class or module level: the table and the
protocol's own list of names agree, so no handler is dead and no name goes unanswered."""

from __future__ import annotations

import inspect

from hypervisor_sim import guest_drivers
from hypervisor_sim.core import Hypervisor
from hypervisor_sim.protocol import CALLS
from qemu_model.qmp import SCHEMA
from qemu_model.server import DeviceModel

#: Calls the hypervisor's trio shell runs itself (the guest actor and batched calls).
SHELL_CALLS = {"guest", "guest_driver", "sequence"}
#: Commands the QMP session answers before the shell sees them.
SESSION_COMMANDS = {"qmp_capabilities", "query-commands"}


def test_every_hypercall_has_one_handler() -> None:
    assert set(Hypervisor.HYPERCALLS) == set(CALLS) - SHELL_CALLS
    handlers = {name for name, _ in inspect.getmembers(Hypervisor) if name.startswith("_call_")}
    assert handlers == {f.__name__ for f in Hypervisor.HYPERCALLS.values()}


def test_every_qmp_command_has_one_handler() -> None:
    assert set(DeviceModel.QMP_COMMANDS) == set(SCHEMA) - SESSION_COMMANDS
    handlers = {name for name, _ in inspect.getmembers(DeviceModel) if name.startswith("_cmd_")}
    assert handlers == {f.__name__ for f in DeviceModel.QMP_COMMANDS.values()}


def test_every_guest_driver_action_and_device_has_a_handler() -> None:
    assert set(guest_drivers.ACTIONS) < set(guest_drivers._ACTION_TABLE)
    assert set(guest_drivers._MODE_SET) == set(guest_drivers.DEVICES)
