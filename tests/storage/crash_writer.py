"""A writer to kill: random writes and discards into a qcow2 overlay, one byte to a log after each returns.

``python crash_writer.py IMAGE LOG SEED`` runs :func:`operations` forever (until killed). The test
replays the same seeded sequence for the number of bytes in LOG to know which writes were
acknowledged, and which one was in flight (its blocks may hold old or new data).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Iterator

BLOCK = 2048
DISK = 4 << 20


def operations(seed: int) -> Iterator[tuple[str, int, int, int]]:
    """``(kind, offset, length, data_seed)``: writes of 1-40 blocks, and a discard now and then."""
    rng = random.Random(seed)
    step = 0
    while True:
        blocks = rng.randrange(1, 41)
        offset = rng.randrange(DISK // BLOCK - blocks + 1) * BLOCK
        kind = "discard" if rng.random() < 0.1 else "write"
        yield kind, offset, blocks * BLOCK, seed * 1_000_003 + step
        step += 1


def data(data_seed: int, length: int) -> bytes:
    return random.Random(data_seed).randbytes(length)


def main() -> None:
    from labkit.storage import open_image

    image_path, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    image = open_image(image_path, writable=True)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    for kind, offset, length, data_seed in operations(seed):
        if kind == "write":
            image.write(offset, data(data_seed, length))
        else:
            image.discard(offset, length)
        os.write(log, b".")


if __name__ == "__main__":
    main()
