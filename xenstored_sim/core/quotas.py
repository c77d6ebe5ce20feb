"""Per-domain quotas of C xenstored 4.17 (docs/xenstore.md, 'Quotas').

They bind unprivileged domains only: dom0 and socket connections are exempt (docs/xenstore.md,
'Quotas').
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

from .errors import XsErrno


@dataclass(slots=True)
class Quotas:
    """Hard quotas, named as C 4.17's ``-Q`` and CONTROL ``quota`` name them."""

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    outstanding: int = 20
    transaction_nodes: int = 1024
    memory: int = 2621440
    node_size: int = 2048
    path_max: int = 2048
    permissions: int = 5
    soft_memory: int = 2097152

    def set(self, name: str, value: int) -> None:
        """Set a quota by its C name (``transaction-nodes``...); EINVAL if unknown or < 1."""
        attr = QUOTA_ALIASES.get(name)
        if attr is None or attr == "soft_memory" or value < 1:
            raise XsErrno("EINVAL")
        if attr == "path_max":
            value = min(value, 2048)  # capped at XENSTORE_REL_PATH_MAX (docs/xenstore.md, 'Quotas')
        setattr(self, attr, value)


#: C 4.17 quota names (``xenstore-control quota``) -> attribute.  ``node-permissions`` is the
#: name newer releases use for ``permissions``.
QUOTA_ALIASES: Final = {f.name.replace("_", "-"): f.name for f in fields(Quotas)} | {
    "node-permissions": "permissions"
}

# The CONTROL "quota" table of C 4.17: (name, attribute, description), in its order.
QUOTA_TABLE: Final = (
    ("nodes", "nodes", "Nodes per domain"),
    ("watches", "watches", "Watches per domain"),
    ("transactions", "transactions", "Transactions per domain"),
    ("outstanding", "outstanding", "Outstanding requests per domain"),
    ("transaction-nodes", "transaction_nodes", "Max. number of accessed nodes per transaction"),
    ("memory", "memory", "Total Xenstore memory per domain (error level)"),
    ("node-size", "node_size", "Max. size of a node"),
    ("path-max", "path_max", "Max. length of a node path"),
    ("permissions", "permissions", "Max. number of permissions per node"),
)
SOFT_QUOTA_TABLE: Final = (
    ("memory", "soft_memory", "Total Xenstore memory per domain (warning level)"),
)
