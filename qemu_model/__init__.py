"""qemu-model: a Xen HVM device model shaped like QEMU's Xen support.

Pure core: :mod:`.mapcache` (``xen-mapcache.c``), :mod:`.xen_hvm` (the physmap of
``xen-hvm.c``), :mod:`.pci`, :mod:`.vga`, :mod:`.cirrus`, :mod:`.qxl`, :mod:`.vmstate`,
:mod:`.qmp` and :mod:`.machine`.  Shell: :mod:`.server` and :mod:`.cli` (``qemu-model``).
"""
