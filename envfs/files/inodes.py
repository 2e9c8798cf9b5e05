"""The inode table: FUSE inode numbers for backing files, and the names they are known by.

Inodes are numbered here, not by the backing filesystem (one backing file, found under
several hard-linked names, is one node). A node remembers the ``(parent inode, name)``
links it was found under, and the names leading to it are rebuilt from them, so renaming a
directory needs no bookkeeping for its descendants. Nodes live while the kernel holds a
lookup on them or a file on them is open; inode numbers are never reused.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from envfs.files.cryptfile import CryptFile

ROOT_INODE = 1


@dataclass(eq=False)
class Node:
    ino: int
    key: tuple[int, int]  # backing (st_dev, st_ino)
    lookups: int = 0
    links: dict[tuple[int, bytes], None] = field(default_factory=dict)  # ordered set
    file: CryptFile | None = None  # while open
    opens: int = 0


class InodeTable:
    """Nodes by inode number, by backing identity and by ``(parent, name)``."""

    def __init__(self, root_path: bytes, root_key: tuple[int, int]) -> None:
        self.root_path = root_path
        root = Node(ROOT_INODE, root_key, lookups=1)
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, int], Node] = {root_key: root}
        self._names: dict[tuple[int, bytes], Node] = {}
        self._next_ino = ROOT_INODE + 1

    def node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, "stale inode")
        return node

    def entry(self, ino: int) -> tuple[int, bytes]:
        """The ``(parent inode, name)`` a node is reached by: its first link whose folder is
        still known.

        The kernel may forget one folder of a hard-linked file while it keeps the file
        through another: such links are skipped.

        Raises:
            OSError: ESTALE, the node has no known name (removed, or the root).
        """
        node = self.node(ino)
        link = next((link for link in node.links if link[0] in self._nodes), None)
        if link is None:
            raise OSError(errno.ESTALE, "node has no known name")
        return link

    def names(self, ino: int) -> list[bytes]:
        """The names leading from the root to a node (empty for the root)."""
        parts: list[bytes] = []
        while ino != ROOT_INODE:
            ino, name = self.entry(ino)
            parts.append(name)
        parts.reverse()
        return parts

    def path(self, ino: int) -> bytes:
        """The backing path of a node (for messages: the backing folder is reached through
        directory descriptors, never by path; see :mod:`envfs.files.tree`)."""
        return b"/".join([self.root_path, *self.names(ino)])

    def remember(self, parent: int, name: bytes, key: tuple[int, int], lookups: int) -> Node:
        """The node of backing file ``key`` found as ``name`` in ``parent``."""
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next_ino, key)
            self._next_ino += 1
            self._nodes[node.ino] = node
            self._by_key[key] = node
        self.link(node, parent, name)
        node.lookups += lookups
        return node

    def link(self, node: Node, parent: int, name: bytes) -> None:
        old = self._names.get((parent, name))
        if old is not None and old is not node:
            old.links.pop((parent, name), None)
        node.links[(parent, name)] = None
        self._names[(parent, name)] = node

    def unlink_name(self, parent: int, name: bytes) -> Node | None:
        """Forget the name ``name`` in ``parent``; returns the node it named, if known."""
        node = self._names.pop((parent, name), None)
        if node is not None:
            node.links.pop((parent, name), None)
        return node

    def drop_if_unused(self, node: Node) -> None:
        if node.ino != ROOT_INODE and node.lookups <= 0 and node.opens == 0:
            self._nodes.pop(node.ino, None)
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            for link in node.links:
                if self._names.get(link) is node:
                    del self._names[link]

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups -= count
            self.drop_if_unused(node)
