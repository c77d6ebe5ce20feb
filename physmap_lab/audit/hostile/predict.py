"""The expected outcome of each attack, from the principal's credentials and the ACLs alone.

Pure.  The rules are C xenstored 4.17's (tools/xenstored/core.c: perm_for_conn(),
errno_from_parents(), do_set_perms(); domain.c: do_introduce(), do_release(),
do_set_target(); the quota check of domain_nbentry_inc()) and the hypervisor's
(xen/include/xsm/dummy.h: XSM_DM_PRIV; Linux drivers/xen/privcmd.c: privcmd_ioctl_restrict()):

* a privileged (dom0 socket) connection may do anything, quotas do not bind it;
* a domain's connection gets everything on nodes owned by it or by its SET_TARGET domain,
  else the first ACL entry naming either, else the owner entry's letter for everyone;
* creating a node needs write on its nearest existing ancestor, and counts against the
  creator's node quota, its name against its parent's node size (ENOSPC past either);
  changing permissions needs ownership;
* INTRODUCE, RELEASE and SET_TARGET are privileged-only (EACCES);
* watch events of ``@introduceDomain`` reach a watcher that may read that special node;
* a privcmd handle restricted to one domain gets EPERM for any other.

Kept apart from :mod:`xenstored_sim.core`, so that the attack matrix checks the daemon
instead of repeating it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

R: Final = 1
W: Final = 2
OWNER: Final = 4
ALL: Final = R | W | OWNER
_LETTER: Final = {"n": 0, "r": R, "w": W, "b": R | W}

#: The xenstore-side attacks and what each needs on its node.
_NEEDS: Final = {"xs-read": R, "xs-write": W}
#: C 4.17's node-size quota (``-S``, ``quota node-size``): a node's value, permissions and
#: the names of its children, in bytes (xenstore-facts.md §7).
NODE_SIZE: Final = 2048
#: The reason of a watch that registered but was told nothing.
NO_EVENT: Final = "no event"
PRIVILEGED_ONLY: Final = frozenset({"introduce", "release", "set-target"})


@dataclass(frozen=True, slots=True)
class Principal:
    """A device model's credentials after init.

    ``xenstore``: ``"dom0"`` (the privileged socket), ``"domain"`` (a stub domain's guest
    socket) or ``"none"`` (closed by xen_restrict).  ``domid`` is the xenstore identity (the stub
    domain), ``target`` its SET_TARGET domain, ``hypervisor_to`` the one domain its privcmd
    handle may name (None: any).
    """

    xenstore: str
    domid: int = 0
    target: int | None = None
    hypervisor_to: int | None = None


@dataclass(frozen=True, slots=True)
class Prediction:
    succeeded: bool
    errno: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"result": "succeeded" if self.succeeded else "refused", "errno": self.errno}


OK: Final = Prediction(True)


def parse_acl(entries: Sequence[str]) -> list[tuple[int, int]]:
    return [(_LETTER[e[0]], int(e[1:], 0)) for e in entries]


def perm_for(p: Principal, acl: Sequence[str]) -> int:
    """C ``perm_for_conn``."""
    if p.xenstore == "dom0":
        return ALL
    entries = parse_acl(acl)
    mine = {p.domid} | ({p.target} if p.target is not None else set())
    if entries[0][1] in mine:
        return ALL
    for mask, who in entries[1:]:
        if who in mine:
            return mask
    return entries[0][0]


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _nearest(path: str, acls: Mapping[str, Sequence[str]]) -> str:
    while path not in acls and path != "/":
        path = _parent(path)
    return path


def node_access(
    p: Principal, path: str, need: int, acls: Mapping[str, Sequence[str]], creating: bool
) -> Prediction:
    """``need`` on ``path``; a write to a missing node needs write on its nearest ancestor."""
    if p.xenstore == "dom0":
        return OK
    if path in acls:
        return OK if perm_for(p, acls[path]) & need == need else Prediction(False, "EACCES")
    anc = _nearest(path, acls)
    allowed = anc in acls and perm_for(p, acls[anc]) & need == need
    if not allowed:
        return Prediction(False, "EACCES")
    return OK if creating else Prediction(False, "ENOENT")


def absolute(p: Principal, path: str) -> str:
    """A relative path is under the connection's home (``/local/domain/<domid>``)."""
    return path if path.startswith(("/", "@")) else f"/local/domain/{p.domid}/{path}"


def predict(
    p: Principal,
    step: Mapping[str, Any],
    acls: Mapping[str, Sequence[str]],
    node_quota: int,
    owned: int = 0,
) -> Prediction:
    """What ``step`` does for principal ``p`` given the ACLs of the nodes it touches (and of
    their ancestors) and the node quota; ``owned`` counts the nodes the principal owns."""
    attack = str(step["attack"])
    if attack == "foreign-map":
        ok = p.hypervisor_to is None or p.hypervisor_to == int(step["domid"])
        return OK if ok else Prediction(False, "EPERM")
    if p.xenstore == "none":
        return Prediction(False, "EBADF")
    if attack in PRIVILEGED_ONLY:
        return OK if p.xenstore == "dom0" else Prediction(False, "EACCES")
    if attack == "watch":
        # Registration is open to all; the attack succeeds if events reach the watcher.
        special = acls.get(str(step["path"]), ["n0"])
        return OK if learns_of(p, special) else Prediction(False, NO_EVENT)
    if attack == "quota-fill":
        where = absolute(p, str(step["path"]))
        made = node_access(p, where, W, acls, creating=True)
        if not made.succeeded or p.xenstore == "dom0":
            return made
        # The fill's own directory plus one node per step, all owned by the creator; and the
        # directory itself, whose children's names count against the node-size quota.
        count = int(step["count"])
        fits = owned + 1 + count <= node_quota and children_bytes(count) < NODE_SIZE
        return OK if fits else Prediction(False, "ENOSPC")
    if attack == "xs-set-perms":
        path = str(step["path"])
        if path not in acls and p.xenstore != "dom0":
            return node_access(p, path, R, acls, creating=False)
        return OK if perm_for(p, acls.get(path, ["n0"])) & OWNER else Prediction(False, "EACCES")
    if attack.startswith("physmap"):
        for path in physmap_paths(step):
            got = node_access(p, path, W, acls, creating=True)
            if not got.succeeded:
                return got
        return OK
    return node_access(p, str(step["path"]), _NEEDS[attack], acls, creating=attack != "xs-read")


def children_bytes(count: int) -> int:
    """The NUL-terminated names ``n0`` .. ``n<count-1>`` of a fill directory's children."""
    return sum(len(f"n{i}") + 1 for i in range(count))


def physmap_paths(step: Mapping[str, Any]) -> list[str]:
    """The nodes a physmap attack writes, in order."""
    base = f"/local/domain/0/device-model/{int(step['domid'])}/physmap"
    keys = ("start_addr", "size", "name")
    return [f"{base}/{e['offset']}/{k}" for e in step["entries"] for k in keys if k in e]


def learns_of(p: Principal, special_acl: Sequence[str]) -> bool:
    """Whether a watch on a special node (``@introduceDomain``) delivers its events."""
    return p.xenstore == "dom0" or (p.xenstore == "domain" and bool(perm_for(p, special_acl) & R))


def touched(step: Mapping[str, Any], p: Principal) -> list[str]:
    """The nodes whose ACLs (and ancestors') :func:`predict` needs for ``step``."""
    attack = str(step["attack"])
    if attack.startswith("physmap"):
        return physmap_paths(step)
    if attack in ("xs-read", "xs-write", "xs-set-perms", "quota-fill", "watch"):
        return [absolute(p, str(step["path"]))]
    return []


def visible(mode: str, stubdom: bool, attack: str, succeeded: bool) -> bool:
    """Whether an attack that did what :func:`predict` says shows on the victim's side.

    A refused attack changes nothing.  Filling nodes starves nobody: each domain's node quota
    is its own, and dom0's fill is unbounded but leaves the victims theirs.  Physmap keys
    matter only to a compat device model, and only if the toolstack carries them: libxl saves
    them from the device model's own directory (qemu-physmap.md §2.1), which for a stub device
    model is the stub's, so the keys a stub writes under dom0's path never reach its image.
    The victims' device models run in dom0.
    """
    if not succeeded or attack == "quota-fill":
        return False
    if attack == "physmap-plant":
        return mode == "compat"
    if attack == "physmap-own":
        return mode == "compat" and not stubdom
    return True
