"""One run that fills a datastore (issue 13: "100 runs that fill a datastore: zero acknowledged writes lost,
every paused VM resumes after space is freed"), at the storage level: the block device comes later.

Several VMs, each with a thick raw base and a qcow2 overlay in one datastore, write random blocks in turn.
A VM whose write is refused (``DatastoreFull``) pauses: it keeps that write pending and waits in
``when_space``. When every VM is paused, space is freed in one of three ways (raise the capacity, commit
the largest overlay into its base, delete an unrelated file), every paused VM must be woken and retries its
pending write (a retry that finds the space taken by the VMs that retried first pauses again until more is
freed: counted), every acknowledged write must read back, and every overlay must check clean.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from pathlib import Path

from labkit.errors import DatastoreFull
from labkit.storage import Datastore, check_image

MIB = 1 << 20
KIB = 1 << 10
DISK = 2 * MIB
WAYS = ("capacity", "commit", "delete")


@dataclasses.dataclass(frozen=True)
class FillRun:
    seed: int
    vms: int
    freed_by: str
    refused: int            # writes refused (each paused a VM)
    resumed: int            # paused VMs woken after space was freed
    paused_again: int       # woken VMs whose retry did not fit (others took the space first) before more was freed
    acknowledged: int
    lost: int               # 4 KiB blocks that do not read what the acknowledged writes put there
    unclean: int            # overlays whose check was not 0


def os_size(path: str) -> int:
    return os.path.getsize(path)


def fill_run(folder: Path, seed: int) -> FillRun:
    rng = random.Random(seed)
    vms = rng.randrange(2, 5)
    freed_by = WAYS[seed % 3]
    store = Datastore(folder / f"lun{seed}", capacity=1 << 40)
    store.create_raw("old-backup.img", 2 * MIB)  # something else on the LUN, deleted to free space
    names = [f"vm{i}" for i in range(vms)]
    for name in names:
        store.create_raw(f"{name}-base.raw", DISK)
        store.create_overlay(f"{name}.qcow2", f"{name}-base.raw", cluster_size=rng.choice([4096, 65536]))
    store.set_capacity(store.used() + rng.randrange(MIB, 3 * MIB))
    disks = {name: store.open(f"{name}.qcow2", barriers=False) for name in names}
    model = {name: bytearray(DISK) for name in names}  # what each VM's disk must read: its acknowledged writes
    acknowledged = 0
    pending: dict[str, tuple[int, bytes]] = {}
    woken: dict[str, threading.Event] = {}
    refused = 0
    for _ in range(20_000):
        running = [name for name in names if name not in pending]
        if not running:
            break
        name = rng.choice(running)
        block = rng.choice([4 * KIB, 16 * KIB, 64 * KIB])
        offset = rng.randrange(DISK // block) * block
        data = rng.randbytes(block)
        try:
            disks[name].write(offset, data)
        except DatastoreFull as error:
            refused += 1
            pending[name] = (offset, data)
            woken[name] = threading.Event()
            store.when_space(error.needed, woken[name].set)
        else:
            model[name][offset:offset + block] = data
            acknowledged += 1
    if len(pending) != vms:
        raise AssertionError(f"seed {seed}: only {len(pending)} of {vms} VMs paused")
    if freed_by == "capacity":
        store.set_capacity(store.capacity + 4 * MIB)
    elif freed_by == "commit":  # consolidate the largest overlay, as an administrator would
        largest = max(names, key=lambda n: os_size(store.file(f"{n}.qcow2")))
        disks[largest].close()
        store.commit(f"{largest}.qcow2")
        disks[largest] = store.open(f"{largest}.qcow2", barriers=False)
    else:
        store.delete("old-backup.img")
    resumed = sum(event.is_set() for event in woken.values())
    again = 0
    for name, (offset, data) in pending.items():  # each woken VM retries its write
        try:
            disks[name].write(offset, data)
        except DatastoreFull:  # the space freed went to the VMs that retried first: pause again, free more
            again += 1
            store.set_capacity(store.capacity + MIB)
            disks[name].write(offset, data)
        model[name][offset:offset + len(data)] = data
        acknowledged += 1
    lost = 0
    for name, disk in disks.items():
        current = disk.read(0, DISK)
        lost += sum(current[i:i + 4 * KIB] != model[name][i:i + 4 * KIB] for i in range(0, DISK, 4 * KIB))
        disk.close()
    unclean = sum(check_image(store.file(f"{name}.qcow2")).exit_code != 0 for name in names)
    return FillRun(seed, vms, freed_by, refused, resumed, again, acknowledged, lost, unclean)
