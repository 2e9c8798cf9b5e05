"""The writer of the fsync crash test: changes a few files through a mount, forever.

Run as ``python crashwriter.py MOUNTPOINT SEED FILE...``. Each file is opened once
(``O_RDWR``; it must exist) and changed by a deterministic sequence of operations that
depends only on the seed, the file's index and its content at the start (:func:`changes`):
appends and overwrites of random sizes and places, a truncation now and then. After a few
operations the file is fsynced, and only then the writer prints one JSON line
``[file, operations done, sha256 of the content]``: from then on that content is promised
to survive a crash of the mount daemon. Before a large write it prints ``[]`` and waits for
a line on its standard input. The test replays :func:`changes` to know every state a file
went through.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Iterator

# An operation: ("write", offset, data) or ("truncate", size, b""); None: fsync now.
Op = tuple[str, int, bytes]

_SIZES = (1, 100, 4095, 4096, 5000, 16383, 16384, 16385, 40000, 131072, 300000, 1 << 20, 2 << 20)
_LARGE = 500_000
_LARGEST = 4 << 20  # a file past this is cut back (the backing folder is a small tmpfs)


def changes(seed: int, index: int, length: int) -> Iterator[Op | None]:
    """The endless operations on file ``index`` whose content is ``length`` bytes at the
    start; None where the writer fsyncs."""
    rng = random.Random(seed * 1000 + index)
    while True:
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            size = rng.choice((*_SIZES, rng.randrange(1, 200000)))
            if length > _LARGEST:
                length = rng.randrange(0, length // 2)
                yield ("truncate", length, b"")
            elif kind < 0.45 or length == 0:
                yield ("write", length, rng.randbytes(size))
                length += size
            elif kind < 0.95:
                offset = rng.randrange(0, length)
                size = min(size, length - offset)
                yield ("write", offset, rng.randbytes(size))
            else:
                length = rng.randrange(0, length + 1)
                yield ("truncate", length, b"")
        yield None


def apply(content: bytearray, op: Op) -> None:
    """Change the model ``content`` as the operation changes the file."""
    kind, offset, data = op
    if kind == "truncate":
        del content[offset:]
    else:
        content[offset : offset + len(data)] = data


def main(mountpoint: str, seed: int, names: list[str]) -> None:
    files = []
    for index, name in enumerate(names):
        path = os.path.join(mountpoint, name)
        fd = os.open(path, os.O_RDWR)
        content = bytearray()  # the content the test checked
        while chunk := os.pread(fd, 1 << 20, len(content)):
            content += chunk
        length = len(content)
        files.append((name, fd, content, changes(seed, index, length), [0]))
    rng = random.Random(seed)
    while True:
        name, fd, content, ops, done = rng.choice(files)
        while (op := next(ops)) is not None:
            kind, offset, data = op
            if kind == "truncate":
                os.ftruncate(fd, offset)
            else:
                if len(data) >= _LARGE:
                    # A large write: a good moment to crash. Say so, and wait for the test.
                    print("[]", flush=True)
                    sys.stdin.readline()
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, offset + len(data) - len(view)) :]
            apply(content, op)
            done[0] += 1
        os.fsync(fd)
        digest = hashlib.sha256(content).hexdigest()
        print(json.dumps([name, done[0], digest]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
