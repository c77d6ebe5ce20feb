"""The device model's user interface: the console surface, QMP ``screendump`` and VNC.

cf. QEMU ui/: ``console.c`` (the surface a display device publishes, ``screendump``),
``vnc.c`` (the VNC server).  :mod:`.console` and :mod:`.rfb` are sans-IO; :mod:`.vnc` is the
trio shell.
"""
