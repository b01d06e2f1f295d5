"""A datastore that fills: the write that does not fit is refused before anything of it lands, nothing
acknowledged is lost, and writes resume when space is freed (commit, delete, a larger capacity, ENOSPC)."""

from __future__ import annotations

import os
import random
import subprocess
import threading

import pytest
from fill_runs import fill_run

from labkit.errors import ConfigError, DatastoreFull, StorageError
from labkit.storage import Datastore, check_image

pytestmark = pytest.mark.unit

MIB = 1 << 20
KIB = 1 << 10


def fill_until_full(disk, rng: random.Random, acknowledged: dict[int, bytes], size: int, block: int = 64 * KIB) -> DatastoreFull:
    """Random block writes until the datastore refuses one; every write that returned is recorded."""
    for _ in range(20_000):
        offset = rng.randrange(size // block) * block
        data = rng.randbytes(block)
        try:
            disk.write(offset, data)
        except DatastoreFull as error:
            return error
        acknowledged[offset] = data
    raise AssertionError("the datastore never filled")


def assert_acknowledged(disk, acknowledged: dict[int, bytes]) -> None:
    for offset, data in acknowledged.items():
        assert disk.read(offset, len(data)) == data, f"acknowledged write at {offset:#x} lost"


@pytest.mark.parametrize("seed", range(9))
def test_full_datastore_loses_nothing_and_every_paused_writer_resumes(tmp_path, seed):
    """Several VMs fill a datastore and pause; space is freed (capacity, commit, delete: seed % 3); each
    paused VM is woken, its pending write then succeeds, and every acknowledged write reads back.
    (benchmarks/fill_datastore_qcow2.py runs 100.)"""
    run = fill_run(tmp_path, seed)
    assert run.refused == run.vms and run.resumed == run.vms, run
    assert run.lost == 0 and run.unclean == 0, run
    assert run.acknowledged > 10


def test_commit_and_delete_free_space_for_a_waiting_writer(tmp_path):
    store = Datastore(tmp_path / "lun", capacity=6 * MIB)
    store.create_raw("a-base.raw", MIB)
    store.create_raw("b-base.raw", MIB)
    store.create_overlay("a.qcow2", "a-base.raw")
    store.create_overlay("b.qcow2", "b-base.raw")
    a, b = store.open("a.qcow2"), store.open("b.qcow2")
    a.write(0, b"a" * MIB)
    rng = random.Random(0)
    acknowledged: dict[int, bytes] = {}
    store.set_capacity(store.used() + 256 * KIB)
    error = fill_until_full(b, rng, acknowledged, MIB, block=4 * KIB)
    woken = threading.Event()
    store.when_space(error.needed, woken.set)
    with pytest.raises(StorageError, match="in use"):
        store.commit("a.qcow2")   # a is still open (its writer holds the lock)
    assert not woken.is_set()
    a.close()
    store.commit("a.qcow2")   # a's clusters move into its thick base (no growth) and a's file shrinks
    assert woken.is_set()
    b.write(0, b"b" * 4 * KIB)
    acknowledged[0] = b"b" * 4 * KIB
    assert_acknowledged(b, acknowledged)
    store.set_capacity(store.used() + 8 * KIB)  # nearly full again: b is refused soon
    error = fill_until_full(b, rng, acknowledged, MIB, block=4 * KIB)
    assert not store.wait_for_space(error.needed, timeout=0.05)
    deleter = threading.Thread(target=store.delete, args=("a.qcow2",))
    deleter.start()
    assert store.wait_for_space(error.needed, timeout=5)
    deleter.join()
    assert_acknowledged(b, acknowledged)
    b.close()
    assert check_image(store.file("b.qcow2")).exit_code == 0
    with store.open("a-base.raw", writable=False) as base:  # type: ignore[attr-defined]
        assert base.read(0, MIB) == b"a" * MIB


def test_a_shared_base_is_not_committed_into_while_another_overlay_reads_it(tmp_path):
    store = Datastore(tmp_path / "lun", capacity=8 * MIB)
    store.create_raw("base.raw", MIB)
    store.create_overlay("clone1.qcow2", "base.raw")
    store.create_overlay("clone2.qcow2", "base.raw")
    clone2 = store.open("clone2.qcow2")
    with store.open("clone1.qcow2") as clone1:  # type: ignore[attr-defined]
        clone1.write(0, b"1" * 4096)
    with pytest.raises(StorageError, match="in use"):
        store.commit("clone1.qcow2")
    with pytest.raises(StorageError, match="in use"):
        store.delete("clone2.qcow2")
    assert clone2.read(0, 4096) == bytes(4096)
    clone2.close()
    store.delete("clone2.qcow2")
    assert "clone2.qcow2" not in store.names()


def test_names_and_capacity_are_checked(tmp_path):
    with pytest.raises(ConfigError):
        Datastore(tmp_path / "x", capacity=0)
    store = Datastore(tmp_path / "x", capacity=MIB)
    for name in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ConfigError):
            store.file(name)
    with pytest.raises(DatastoreFull):
        store.create_raw("too-big.raw", 2 * MIB)
    assert not os.path.exists(store.file("too-big.raw"))


@pytest.fixture
def small_file_system(tmp_path):
    """A 3 MiB tmpfs: writes into it end in ENOSPC (needs root to mount, which the test machines have)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip(f"mounting a small tmpfs needs root: {result.stderr.strip()}")
        pytest.fail(f"mount tmpfs failed as root: {result.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_enospc_from_the_file_system_is_a_full_datastore(small_file_system):
    store = Datastore(small_file_system / "lun", capacity=1 << 40)  # the capacity never binds: the disk does
    store.create_qcow2("disk.qcow2", 64 * MIB, cluster_size=4096)
    disk = store.open("disk.qcow2")
    rng = random.Random(5)
    acknowledged: dict[int, bytes] = {}
    error = fill_until_full(disk, rng, acknowledged, 64 * MIB, block=16 * KIB)
    assert "ENOSPC" in str(error)
    assert_acknowledged(disk, acknowledged)
    with open(store.path + "/filler", "wb"):
        pass
    assert check_image(store.file("disk.qcow2")).exit_code in (0, 3)
    disk.discard(0, 64 * MIB // 2)  # frees clusters inside the image: later writes reuse them
    for offset in [o for o in acknowledged if o < 32 * MIB]:
        del acknowledged[offset]
    data = rng.randbytes(16 * KIB)
    disk.write(0, data)
    acknowledged[0] = data
    assert_acknowledged(disk, acknowledged)
    disk.close()
    assert check_image(store.file("disk.qcow2")).exit_code == 0


def test_writers_in_threads_pause_on_a_full_datastore_and_resume(tmp_path):
    """Three VMs' writers, one thread each: each pauses (waits) when refused, and all resume when a larger
    capacity frees space; every acknowledged write reads back at the end.

    Each writer fills its whole 2 MiB overlay, every 16 KiB block once, and the datastore has 1.5 MiB free
    at the start: no writer can finish before the capacity grows, so all three are refused and wait,
    whatever order the threads run in (with random offsets, a writer that rewrote its own blocks could
    finish without ever being refused, and the test depended on the scheduler).
    """
    store = Datastore(tmp_path / "lun", capacity=64 * MIB)
    store.create_raw("base.raw", 2 * MIB)
    for vm in ("vm1", "vm2", "vm3"):
        store.create_overlay(f"{vm}.qcow2", "base.raw", cluster_size=4096)
    disks = {vm: store.open(f"{vm}.qcow2", barriers=False) for vm in ("vm1", "vm2", "vm3")}  # pausing, not fsync
    store.set_capacity(store.used() + 3 * MIB // 2)
    acknowledged: dict[str, dict[int, bytes]] = {vm: {} for vm in disks}
    pauses = {vm: 0 for vm in disks}
    errors: list[BaseException] = []

    def writer(vm: str) -> None:
        rng = random.Random(vm)
        offsets = [block * 16 * KIB for block in range(2 * MIB // (16 * KIB))]
        rng.shuffle(offsets)
        try:
            for offset in offsets:
                data = rng.randbytes(16 * KIB)
                while True:
                    try:
                        disks[vm].write(offset, data)
                        break
                    except DatastoreFull as error:
                        pauses[vm] += 1
                        if not store.wait_for_space(error.needed, timeout=120):  # beyond the main thread's 60 s
                            raise AssertionError(f"{vm} was never resumed") from error
                acknowledged[vm][offset] = data
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(vm,)) for vm in disks]
    for thread in threads:
        thread.start()
    for _ in range(6000):  # until all three wait
        if store.waiting == 3 or not any(t.is_alive() for t in threads):
            break
        threading.Event().wait(0.01)
    assert not errors, errors
    assert store.waiting == 3 and all(pauses.values()), (store.waiting, pauses)
    store.set_capacity(store.used() + 16 * MIB)
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    for vm, disk in disks.items():
        assert len(acknowledged[vm]) == 2 * MIB // (16 * KIB)
        assert_acknowledged(disk, acknowledged[vm])
        disk.close()
        assert check_image(store.file(f"{vm}.qcow2")).exit_code == 0


def test_used_space_counts_a_file_deleted_while_it_is_listed_as_gone(tmp_path):
    """used() lists the folder, then measures each file: a delete in another thread between the two is normal."""
    store = Datastore(tmp_path / "lun", capacity=64 * MIB)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            store.create_raw("churn.raw", 4 * KIB)
            store.delete("churn.raw")

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        sizes = {store.used() for _ in range(3000)}
    finally:
        stop.set()
        churner.join()
    assert sizes <= {0, 4 * KIB}


def test_processes_sharing_a_datastore_see_one_capacity_and_never_overfill_it(tmp_path):
    """Forked writers (as emulator workers are) grow files in one datastore at once: the capacity set in the
    parent after the fork is the one they are held to, and together they never pass it (the lock is the folder's)."""
    store = Datastore(tmp_path / "lun", capacity=MIB)
    reader, writer = os.pipe()
    children = []
    for number in range(3):
        pid = os.fork()
        if pid == 0:  # a writer: wait for the go, then grow its file 4 KiB at a time until refused
            code = 1
            try:
                os.close(writer)
                os.read(reader, 1)
                from labkit.storage.hostfile import ImageFile

                file = ImageFile(store.file(f"disk{number}"), writable=True, create=True)
                try:
                    while True:
                        store.grow(file, file.length + 4 * KIB)
                except DatastoreFull:
                    code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.close(reader)
    store.set_capacity(3 * MIB)  # after the fork: the children read it from the folder
    os.write(writer, b"go!")
    os.close(writer)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0, 0]
    assert store.used() == 3 * MIB  # every 4 KiB step that fit was taken, none past the capacity
    assert sorted(store.names()) == ["disk0", "disk1", "disk2"]
    assert Datastore(tmp_path / "lun").capacity == 3 * MIB  # opened again from the folder alone


def test_a_folder_without_a_descriptor_is_not_a_datastore(tmp_path):
    with pytest.raises(ConfigError, match="is not a datastore"):
        Datastore(tmp_path)
