"""The node store: a flat dict from absolute path to node.

Theory of operation.  Every node lives in one dict keyed by its absolute path, so a lookup is
one hash probe at any depth, and nothing walks the tree recursively (XSA-418: a 1000-level
tree must not exhaust the stack).  A node keeps its children's names in a dict used as an
insertion-ordered set, because C xenstored lists children in creation order and a removed and
re-created child moves to the end (oracle README, "Tree semantics").

Every modification stamps the node with the next value of one global counter, the
*generation* (docs/xenstore.md, 'Transactions').  DIRECTORY_PART reports it and transactions compare
it at commit.  The counter advances exactly as in C 4.17, so generation numbers match the oracle's:
a created node, each written node, each deleted node and each removal of a child entry from a parent
all take one number, and TRANSACTION_START takes one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import MappingProxyType
from typing import Final

from .paths import child_path
from .perms import DEFAULT_PERMS, Perms

#: The generation recorded for a node that does not exist.
NO_GENERATION = -1

# C 4.17 sizes a node as its record header plus 8 bytes per permission entry, the value and
# the NUL-terminated child names (struct xs_tdb_record_hdr; docs/xenstore.md, 'Quotas').
NODE_HEADER_SIZE = 24
PERM_ENTRY_SIZE = 8

#: The children of every leaf: one shared, read-only empty mapping instead of an empty dict
#: per node (most nodes are leaves).
NO_CHILDREN: Final[MappingProxyType[str, None]] = MappingProxyType({})


class Node:
    """One node: a binary value, a permission list and its children's names in order.

    ``children`` is read-only to callers: :meth:`add_child` and :meth:`remove_child` change
    it.  Child names are interned, so the names that recur under many parents (``n0``,
    ``backend``, ...) are stored once.
    """

    __slots__ = ("acc", "children", "generation", "perms", "value")

    def __init__(self, value: bytes, perms: Perms, children: dict[str, None] | None = None) -> None:
        self.value = value
        # Bytes charged to the memory quota of the owner (store nodes) or of the transaction
        # holding this private copy; 0 for nodes of dom0, which no quota binds.
        self.acc = 0
        self.perms = perms
        self.children: dict[str, None] | MappingProxyType[str, None] = (
            children if children else NO_CHILDREN
        )
        self.generation = 0

    def copy(self) -> Node:
        children = self.children
        node = Node(self.value, self.perms, dict(children) if children else None)
        node.generation = self.generation
        return node

    def add_child(self, name: str) -> None:
        """Append ``name`` to the children (a removed and re-created child goes last)."""
        children = self.children
        if isinstance(children, dict):
            children[sys.intern(name)] = None
        else:
            self.children = {sys.intern(name): None}

    def remove_child(self, name: str) -> None:
        children = self.children
        if isinstance(children, dict):
            children.pop(name, None)
            if not children:
                self.children = NO_CHILDREN

    @property
    def owner(self) -> int:
        return self.perms[0][1]

    def children_blob(self) -> bytes:
        """The DIRECTORY reply: every child name followed by a NUL."""
        if not self.children:
            return b""
        return "\0".join(self.children).encode() + b"\0"

    def size(self) -> int:
        """The size the ``node-size`` quota compares (C 4.17 record size)."""
        childlen = sum(len(c) + 1 for c in self.children)
        return NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(self.perms) + len(self.value) + childlen


class Store:
    """All nodes, the generation counter and the node count of every owner."""

    __slots__ = ("generation", "memory", "nodes", "owned")

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.generation = 0
        # domid -> number of nodes whose first permission entry names it (the node quota)
        self.owned: dict[int, int] = {}
        # domid -> bytes of the nodes it owns, as C 4.17 charges them to the memory quota:
        # the record (Node.size) plus the path (the TDB key); dom0 is not charged here.
        self.memory: dict[int, int] = {}
        # xenstored_core.c setup_structure: "/", "/tool", "/tool/xenstored", owned by dom0.
        # The oracle's counter stands at 4 once they exist.
        root = Node(b"", DEFAULT_PERMS, {"tool": None})
        tool = Node(b"", DEFAULT_PERMS, {"xenstored": None})
        xenstored = Node(b"", DEFAULT_PERMS)
        root.generation, tool.generation, xenstored.generation = 1, 2, 3
        self.nodes.update({"/": root, "/tool": tool, "/tool/xenstored": xenstored})
        self.owned[0] = 3
        self.generation = 4

    def next_generation(self) -> int:
        gen = self.generation
        self.generation = gen + 1
        return gen

    def count_owner(self, domid: int, delta: int) -> None:
        self.owned[domid] = self.owned.get(domid, 0) + delta

    def charge(self, path: str, node: Node) -> None:
        """Re-account ``node`` stored at ``path`` to its owner's memory (docs/xenstore.md, 'Quotas',
        C ``do_tdb_write``).  ``node.acc`` is always charged to the current owner: an owner change
        must :meth:`uncharge` first."""
        owner = node.perms[0][1]
        acc = node.size() + len(path) if owner else 0
        if acc != node.acc:
            self.memory[owner] = self.memory.get(owner, 0) + acc - node.acc
            node.acc = acc

    def uncharge(self, node: Node) -> None:
        """Take ``node`` out of its owner's memory (deleted, or about to change owner)."""
        if node.acc:
            owner = node.perms[0][1]
            self.memory[owner] -= node.acc
            node.acc = 0

    def recount_memory(self) -> None:
        """Recompute every node's charge (after a restore that bypassed :meth:`charge`)."""
        self.memory.clear()
        for path, node in self.nodes.items():
            node.acc = 0
            if node.perms[0][1]:
                self.charge(path, node)

    def walk(self, top: str = "/") -> Iterator[tuple[str, Node]]:
        """Pre-order walk in child order, without recursion."""
        nodes = self.nodes
        stack = [top]
        while stack:
            path = stack.pop()
            node = nodes.get(path)
            if node is None:
                continue
            yield path, node
            stack.extend(child_path(path, name) for name in reversed(node.children))
