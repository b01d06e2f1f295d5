"""``labkit disk create|info|check|commit|map`` as a student types them, with qemu-img check's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qemu_tools import qemu_img, qemu_io

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def labkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "labkit.cli", "disk", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def test_create_info_map_commit(tmp_path):
    assert labkit("create", "-f", "raw", "base.raw", "4M", cwd=tmp_path).returncode == 0
    assert labkit("create", "-b", "base.raw", "--cluster-size", "4K", "top.qcow2", cwd=tmp_path).returncode == 0
    qemu_io(str(tmp_path / "top.qcow2"), "write -P 9 8k 12k")
    ours = json.loads(labkit("info", "--output", "json", "top.qcow2", cwd=tmp_path).stdout)
    theirs = json.loads(qemu_img("info", "--output", "json", str(tmp_path / "top.qcow2")).stdout)
    assert set(theirs) - {"actual-size"} <= set(ours)
    for key in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "format-specific"):
        assert ours[key] == theirs[key]
    extents = json.loads(labkit("map", "--output", "json", "top.qcow2", cwd=tmp_path).stdout)
    assert [(e["start"], e["length"], e["depth"]) for e in extents if e["depth"] == 0] == [(8192, 12288, 0)]
    human = labkit("map", "top.qcow2", cwd=tmp_path).stdout
    assert "top.qcow2" in human and "0x2000" in human
    done = labkit("commit", "top.qcow2", cwd=tmp_path)
    assert done.returncode == 0 and "12288 bytes" in done.stdout
    qemu_io(str(tmp_path / "base.raw"), "read -P 9 8k 12k", fmt="raw")
    assert labkit("check", "top.qcow2", cwd=tmp_path).returncode == 0


def test_check_exit_codes_are_qemu_imgs(tmp_path):
    assert labkit("create", "disk.qcow2", "1M", "--cluster-size", "4K", cwd=tmp_path).returncode == 0
    qemu_io(str(tmp_path / "disk.qcow2"), "write -P 1 0 64k")
    clean = labkit("check", "disk.qcow2", cwd=tmp_path)
    assert clean.returncode == 0 and "No errors" in clean.stdout
    path = tmp_path / "disk.qcow2"
    raw = bytearray(path.read_bytes())
    # A leak: raise the refcount of the last data cluster from 1 to 2 (refcount block at cluster 2, 16-bit entries).
    last = len(raw) // 4096 - 1
    leaky = bytearray(raw)
    leaky[2 * 4096 + 2 * last:2 * 4096 + 2 * last + 2] = (2).to_bytes(2, "big")
    path.write_bytes(leaky)
    assert qemu_img("check", str(path), check=False).returncode == 2  # QEMU also counts the COPIED flag
    assert labkit("check", "disk.qcow2", cwd=tmp_path).returncode == 2
    # A pure leak: a refcount for a cluster nothing references, past the data.
    raw += bytes(4096)
    raw[2 * 4096 + 2 * (last + 1):2 * 4096 + 2 * (last + 1) + 2] = (1).to_bytes(2, "big")
    path.write_bytes(raw)
    assert qemu_img("check", str(path), check=False).returncode == 3
    leaked = labkit("check", "disk.qcow2", cwd=tmp_path)
    assert leaked.returncode == 3 and "leaked" in leaked.stdout
    report = json.loads(labkit("check", "--output", "json", "disk.qcow2", cwd=tmp_path).stdout)
    assert report["leaks"] == 1
    repaired = labkit("check", "-r", "leaks", "disk.qcow2", cwd=tmp_path)
    assert repaired.returncode == 0 and "1 leaked clusters were repaired" in repaired.stdout
    assert qemu_img("check", str(path), check=False).returncode == 0
    # Corruption: a data cluster's refcount 0 while the L2 table points at it.
    raw = bytearray(path.read_bytes())
    raw[2 * 4096 + 2 * last:2 * 4096 + 2 * last + 2] = bytes(2)
    path.write_bytes(raw)
    corrupt = labkit("check", "disk.qcow2", cwd=tmp_path)
    assert corrupt.returncode == 2 and "ERROR" in corrupt.stdout
    assert qemu_img("check", str(path), check=False).returncode == 2
    missing = labkit("check", "nothing.qcow2", cwd=tmp_path)
    assert missing.returncode == 1 and "cannot open" in missing.stderr


def test_bad_input_is_one_line(tmp_path):
    done = labkit("create", "x.qcow2", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "size" in done.stderr
    (tmp_path / "junk.qcow2").write_bytes(b"QFI\xfb" + bytes(100))
    done = labkit("info", "junk.qcow2", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("labkit: error: ") and done.stderr.count("\n") == 1


def test_check_json_matches_qemu_img(tmp_path):
    assert labkit("create", "disk.qcow2", "4M", cwd=tmp_path).returncode == 0
    qemu_io(str(tmp_path / "disk.qcow2"), "write -P 1 0 300k", "write -P 2 2M 64k")
    ours = json.loads(labkit("check", "--output", "json", "disk.qcow2", cwd=tmp_path).stdout)
    theirs = json.loads(qemu_img("check", "--output", "json", str(tmp_path / "disk.qcow2")).stdout)
    theirs["filename"] = "disk.qcow2"
    assert ours == theirs


def test_check_json_counts_zero_clusters_with_a_host_cluster_as_qemu_does(tmp_path):
    assert labkit("create", "disk.qcow2", "1M", "--cluster-size", "4K", cwd=tmp_path).returncode == 0
    qemu_io(str(tmp_path / "disk.qcow2"), "write -P 1 0 64k", "write -z 0 32k", "write -P 3 200k 12k")
    ours = json.loads(labkit("check", "--output", "json", "disk.qcow2", cwd=tmp_path).stdout)
    theirs = json.loads(qemu_img("check", "--output", "json", str(tmp_path / "disk.qcow2")).stdout)
    theirs["filename"] = "disk.qcow2"
    assert ours == theirs
