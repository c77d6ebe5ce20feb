"""A compromised device model: the attack catalogue run with a device model's credentials.

``qemu-model --hostile SCRIPT`` starts as the device model of ``--domid`` would (the same
xenstore socket, the same hypervisor connection, restricted as ``--restrict`` and
``--qemu-version`` restrict it), then runs the attacks of SCRIPT instead of emulating devices.
"""
