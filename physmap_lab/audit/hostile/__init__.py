"""``physmap-lab audit --hostile``: what a compromised device model reaches in each mode.

:mod:`.predict` says what C xenstored's permission rules and the hypervisor's restriction let
each configuration's device model do (pure); :mod:`.configs` names the configurations;
:mod:`.runner` runs the attacker (``qemu-model --hostile``) in each one on a stack with two
victim guests and reads every success back from the victim's side; :mod:`.report` draws it.
"""
