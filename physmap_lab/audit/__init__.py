"""``physmap-lab audit``: who needed which xenstore access, and what the legacy physmap costs.

The pure modules turn the audit logs of a run into findings (:mod:`.phases`, :mod:`.scenario`,
:mod:`.privilege`) and pictures (:mod:`.svg`, :mod:`.report`); :mod:`.runner` is the trio shell
that runs the matrix through the demo's case runner (:class:`physmap_lab.demo.DemoRun`).
"""
