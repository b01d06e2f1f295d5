"""Every notebook runs top to bottom, headless, on every backend this machine has, within a minute.

The backend comes from ``LABKIT_BACKEND`` in the kernel's environment: ``emu``
everywhere (that is also how Binder runs them), and ``kvm`` where ``/dev/kvm``
exists; there the KVM run must happen and pass, never skip.  A run fails on any
error output, on stderr that reads as a traceback, error or warning, and when
the notebook's own content checks (below) do not find what a student should see.
"""

from __future__ import annotations

import html
import re

import nbformat
import pytest
from notebook_execution import NOTEBOOKS, RUN_TIMES, Execution, execute, execute_shared

MAX_SECONDS = 60.0
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="module", autouse=True)
def report_run_times(request):
    """Print each notebook's run time per backend after this module's tests.
    """
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not RUN_TIMES:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "notebook run times")
        for (name, backend), seconds in sorted(RUN_TIMES.items(), key=lambda item: (item[0][0], str(item[0][1]))):
            reporter.write_line(f"{name:<40} {backend or 'auto':>5}  {seconds:6.1f} s")


NO_KVM = "/dev/kvm does not exist (simulated by the notebook test)"
# Makes the kernel see a machine without KVM, as on Binder, even where /dev/kvm exists.
WITHOUT_KVM = f"""
import labkit.kvm.system as system
system.probe = lambda device=None: system.KvmStatus(False, {NO_KVM!r}, None, "unknown", device or "/dev/kvm", None)
"""


def check_welcome(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour, probe

    text = run.text()
    assert "Hello from 64-bit mode!" in text, "hello64's console output is not shown"
    assert "This machine (labkit" in text, "the capability table is missing"
    assert "console: 'A'" in text, "the student's own guest did not print its 'A'"
    assert "They **disagree**" not in text
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    assert f"hello64 on {label}: halted" in text, "the guest-run widget did not show its first run"
    assert len(run.images()) >= 3, f"expected the side-by-side, exit-cost and timeline figures, got {len(run.images())} images"
    assert "measured on the emulator (Unicorn)" in text
    check_quoted_costs_match_the_table(run)
    kvm = kvm or probe()
    if kvm.usable:
        assert f"usable, flavour {kvm.flavour}" in text, "the capability table does not name the KVM flavour"
    else:
        assert f"not usable: {kvm.problem}" in text, "the capability table does not say why KVM is absent"
    if backend == "kvm":
        assert "backends run: kvm, emu. They agree" in text, "hello did not run on both backends, or they differ"
        assert f"measured on KVM ({kvm_flavour()})" in text
        assert "main backend of this session: **kvm**" in text
    else:
        assert "backends run: emu" in text and "backends run: kvm" not in text
        assert "emulation only" in text or "not usable" in text, "the notebook does not say why KVM was skipped"
        assert "Only one backend ran in this session" in text and "They agree" not in text
        assert "main backend of this session: **emu**" in text
    assert "The notebooks of this lab" in text and "01-protection-rings.ipynb" in text, "the list of notebooks is missing"


def outputs_of(run: Execution, mime: str) -> list[str]:
    return [output["data"][mime] for cell in run.notebook.cells for output in cell.get("outputs", [])
            if mime in output.get("data", {})]


def check_quoted_costs_match_the_table(run: Execution) -> None:
    """00's sentence about what the exits cost quotes exactly the numbers its cost table shows, from the same run."""
    quoted = [text for text in outputs_of(run, "text/markdown") if text.startswith("In the run you just made")]
    assert len(quoted) == 1, "the paragraph filled from the run is missing"
    table = next(html for html in outputs_of(run, "text/html") if "What the exits cost" in html)
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        if cells:
            rows[cells[0]] = cells[1:]
    bullets = re.findall(r"\* \*\*(.+?)\*\*: (\d+) exits\. The first ended (\S+ \S+) after the start; "
                         r"after it, one exit followed the previous one every (\S+ \S+) \(median\), "
                         r"of which labkit's handling took (\S+ \S+)\.", quoted[0])
    assert bullets and len(bullets) == len(rows), quoted[0]
    for label, exits, first, since, handling in bullets:
        assert rows[html.escape(label)][:4] == [exits, first, since, handling], (label, rows)


def check_binary_translation(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour

    from labkit.monitor.robin_irvine import ALL_PROBES

    text = run.text()
    assert "binary translation gives the native console: True" in text
    assert "lines where trap-and-emulate differs from native: 5" in text
    rows = len(ALL_PROBES)
    assert f"What the kernel sees, {rows} instructions on" in text, "the Robin & Irvine table is missing"
    assert f"binary translation gives the native value in {rows} of {rows}." in text
    assert f"sees something else than natively in **17 of {rows}** rows" in text
    assert "≠ #GP: kernel halted" in text, "trap-and-emulate's #GP for the far transfers is not shown"
    pvm_rows = "The native column of LAR, LSL, VERR, VERW, INT n comes from the emulator"
    assert (pvm_rows in text) == (backend == "kvm" and kvm_flavour() == "kvm_pvm")
    assert "binary translation: 2 stores into translated code trapped, 2 translated blocks thrown away" in text
    assert "int3               ; -> monitor: emulate popfq" in text, "the translated block is not shown"
    assert "≠ " in text, "the student's experiment (popfq left untranslated) shows no divergence"
    assert len(run.images()) >= 1, "the T&E vs BT figure is missing"
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    assert f"popf on {label}, left untranslated: popfq. The translated console is different" in text
    assert "Exit 0 of " in text, "the exit stepper did not show the first exit"
    if backend == "kvm":
        assert f"measured on KVM ({kvm_flavour()})" in text
    else:
        assert "measured on the emulator (Unicorn)" in text


def check_trap_and_emulate(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour

    text = run.text()
    assert "The 5 of 13 console lines that differ" in text, "the native vs trap-and-emulate comparison is missing"
    for line in ("cli, then pushf: IF = 1", "IF in the interrupted code = 0", "sgdt: GDT base 0x1000",
                 "sidt: IDT base 0x2000", "TS = 0"):
        assert line in text, f"the divergent line {line!r} is not shown"
    assert "Under the monitor `smsw` printed `0x80010031, TS = 0`: the whole CR0" in text
    if backend == "kvm":
        assert "are the same on every backend run (kvm, emu)" in text
    else:
        assert "Only emu ran in this session" in text and "on every backend run" not in text
    assert "`error: unemulated instruction at RIP 0x8003: wbinvd`" in text
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    assert f"cli_pushf on {label}: native halted" in text, "the routine widget did not show its first run"
    assert "ticks after sti: 0x1" in text and "ticks after popf: 0x0" in text
    assert "vector 13" not in text and "#GP" in text, "exceptions are shown by name"
    assert "What the monitor did: 1051 traps" in text
    assert "is usually quoted as 17 instructions; the two groups in their paper name 18 mnemonics" in text
    assert len(run.images()) >= 1, "the trap profile figure is missing"
    if backend == "kvm":
        assert "backends run: kvm, emu" in text
        assert f"measured on KVM ({kvm_flavour()})" in text and "µs per trap round trip" in text
        if kvm_flavour() == "kvm_pvm":
            assert "So here changing rings is **not** free of VM exits." in text
            assert "from the host (intercepted by the host)" in text, "the classifier's host label is missing"
    else:
        assert "backends run: emu" in text and "backends run: kvm" not in text
        assert "measured on the emulator (Unicorn)" in text
        assert "KVM did not run in this session, so there are no VM exits to count" in text
        assert "from the host" not in text.replace("*from the host*", "")


def check_rings(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour

    text = run.text()
    assert "hello from ring 3" in text, "rings64's task did not print"
    assert "exited with code 0" in text
    assert "P=1 protection violation, W/R=1 write, U/S=1 from user mode" in text, "no decoded #PF error code"
    assert "0x00030000" in text, "the page-fault table does not show CR2"
    # A trap's row names the trapping instruction, not the one after it (the CPU saves the next RIP).
    assert re.search(r"syscall from ring 3\s+3 → 0\s+0x[0-9a-f]+\s+syscall\s+a trap", text), "syscall misattributed"
    assert "int 0x80 from ring 3                         3 → 0  0x83ac  int 0x80" in text or backend == "kvm"
    assert re.search(r"matches the paper on emulator \(Unicorn\): \d+ of \d+", text), "the Robin & Irvine table is missing"
    assert "`smsw eax` (64-bit) is **sensitive**" in text, "the classifier cell did not run"
    assert "smsw eax on " in text, "the instruction widget did not show its first verdict"
    assert "UMIP covers 5 of the 18 instructions" in text
    assert len(run.images()) >= 2, f"expected ring timelines, got {len(run.images())} images"
    if backend == "kvm":
        flavour = kvm_flavour()
        assert "backends run: kvm, emu" in text
        assert f"measured on KVM ({flavour})" in text
        assert len(run.images()) >= 3
        if flavour == "kvm_pvm":
            assert "#UD from ring 3" in text, "PVM's #UD for int 0x80 is not shown"
            assert "#GP (error 0x0) from ring 0" in text and "return to ring 3 failed" in text, \
                "PVM's faulting sysretq is not shown as the kernel's"
            assert "The kernel was entered **differently** at 3 of 11 instructions" in text
            assert re.search(r"matches the paper on KVM \(kvm_pvm\): \d+ of 18; \d+ undetermined", text)
            assert "with CR4.UMIP = 1 it traps in ring 3" in text
        else:
            assert "The kernel was entered the same way on every backend." in text
    else:
        assert "backends run: emu" in text and "backends run: kvm" not in text
        assert "measured on the emulator (Unicorn)" in text
        assert "Only emulator (Unicorn) ran in this session" in text and "entered **differently**" not in text
        assert "does not let the guest set CR4.UMIP" in text, "the UMIP result of the emulator is not shown"


def check_hardware_assisted(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import probe

    text = run.text()
    where = "run on KVM (" if backend == "kvm" else "run on the emulator (Unicorn 2.1.4)"
    assert f"VM exits of a model of VMX {where}" in text, "the model's exit table is missing or unlabelled"
    assert "size 1, direction IN, string no, REP no, operand DX, port 0x3fd" in text, "no decoded I/O qualification"
    assert "Its console is the same as its native console" in text
    assert "The console equals the native one under **4 of 4** presets" in text
    assert "minikernel64 under a model of VMX on " in text, "the VMCS panel did not show its first run"
    assert "One workload, every technique, run on " in text and "The workload under trap-and-emulate on " in text
    assert "* **VMX model**: 1031 VM exits (model) (3 besides the console)" in text
    assert "* **paravirtual**: " in text and "hypercalls and bounces" in text
    assert "* **trap-and-emulate**: " in text and "no: 5 line(s) differ" in text
    assert len(run.images()) >= 3, f"expected the exit, VMCS-panel and technique figures, got {len(run.images())}"
    kvm = kvm or probe()
    if backend == "kvm":
        from labkit.kvm.system import kvm_flavour

        assert "backends run: kvm, emu" in text
        # KVM's own exit counter: the 1,029 exits labkit saw plus any KVM handled itself (a host preemption of
        # the vCPU thread is one more now and then), so at least 1,029.
        kvm_row = re.search(r"\* \*\*KVM\*\*: (\d+) VM exits", text)
        assert kvm_row is not None and int(kvm_row.group(1)) >= 1029, "the KVM row is missing or short of exits"
        # The section on what KVM handles itself (its counters, its exit controls).
        assert f"This session runs on **KVM** (`{kvm_flavour()}`)" in text
        assert "What KVM counted and what reached labkit" in text
        assert "The exit-mix guest without and with each exit control" in text
        assert "Console, MMIO device and notifications were the same in every run." in text
        assert f"measured on KVM ({kvm_flavour()})" in text
        assert "KVM exit controls:" in text and "With KVM_IOEVENTFD (notify port):" in text
        if kvm_flavour() == "kvm_pvm":
            assert "This host's KVM is PVM" in text and "Under PVM the HLT control is accepted" in text
        assert len(run.images()) >= 7, "the model's, the techniques' and KVM's four figures"
    else:
        assert "backends run: emu" in text and "* **KVM**: not run here (" in text
        assert ("LABKIT_BACKEND=emu is set" if kvm.usable else kvm.problem) in text
        assert "**No KVM in this session**" in text
        assert "What KVM counted" not in text and "measured on KVM" not in text
def check_paravirtualization(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour

    text = run.text()
    assert "kvm: paravirtual console equals the native one: True" in text or backend != "kvm"
    assert "emu: paravirtual console equals the native one: True; traps at privileged instructions seen by its " \
           "hypervisor: 0" in text
    assert "lines where trap-and-emulate differs from native: 5" in text
    assert "The paravirtual kernel made **36 entries**" in text, "the paragraph filled from the run is missing"
    assert "set_trap_table" in text and "└ set_gdt" in text, "the multicall's entries are not shown"
    assert "bounced to the kernel's handlers: vector 6: 2, vector 14: 1" in text
    assert "privileged-instruction traps: 0" in text
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    assert f"3 routine(s) on {label}: native " in text, "the kernel widget did not show its first run"
    assert "console output correct in every run: True" in text
    ring = re.findall(r"for 64 KiB the UART took \*\*(\d+) exits per KiB\*\*, the ring \*\*([\d.]+)\*\* \((\d+)x fewer\)",
                      text)
    assert len(ring) == (2 if backend == "kvm" else 1), "the UART against ring sentence is missing"
    assert all(int(uart) >= 2048 and int(fewer) >= 50 for uart, _, fewer in ring)
    assert f"64 KiB on {label}, batch of 16: UART 131073 exits" in text, "the batch widget did not show its first run"
    assert len(run.images()) >= 3, "expected the entries figure, the UART/ring figure and the batch widget's figure"
    if backend == "kvm":
        assert "backends run: kvm, emu" in text and "entries by kind the same on every backend run: True" in text
        assert f"measured on KVM ({kvm_flavour()})" in text
        if kvm_flavour() == "kvm_pvm":
            assert "On KVM this host is PVM" in text
    else:
        assert "backends run: emu" in text and "backends run: kvm" not in text
        assert "only emu ran in this session" in text and "Only the emulator ran in this session" in text
        assert "KVM did not run in this session" in text


def check_memory_virtualization(run: Execution, backend: str, kvm=None) -> None:
    text = run.text()
    for ran in (["kvm", "emu"] if backend == "kvm" else ["emu"]):
        assert f"{ran}: shadow paging gives the native console: True; without it: False; under binary " \
               "translation: True" in text
    assert "0 of 11 lines differ" in text, "the shadowed console is not shown beside the native one"
    assert "the kernel's last line: `paging: unexpected #PF at 0x40000000`" in text
    assert "**60 hidden** and **71 true** page faults, **108** trapped page-table stores (the kernel counted 108 " \
           "of its own: every one seen)" in text, "the fault counts filled from the run are missing"
    assert "A TLB miss on 0x40000000: **4** references under shadow paging" in text
    assert "**24** under nested paging" in text, "the EPT model's walk count is missing"
    assert "EPT violation: write of guest-physical 0x110000 (the final access), EPT allows r-x" in text
    assert "The kernel's CR3 loads under shadow paging" in text and "no (kept)" in text
    assert "shadow paging: virtual 0x40000000 under kernel CR3 0x100000 takes 4 memory references" in text, \
        "the address-walk widget did not show its first walk"
    assert "kernel's PT [0] = 0x110063 (P RW A D), never walked by the CPU" in text
    assert len(run.images()) >= 3, "expected the side-by-side tables, the fault timeline and the walk costs"
    if backend == "kvm":
        assert "backends run: kvm, emu" in text
    else:
        assert "backends run: emu" in text and "backends run: kvm" not in text
def check_snapshots(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour

    text = run.text()
    assert f"restored on emu equals the uninterrupted run on {backend}: console True, general registers True" \
        in text, "restore-and-continue did not equal the uninterrupted run"
    assert "the changed run's checksum differs: True" in text
    assert "memtouch: c2e50fb1d7af0100" in text and "memtouch: c2e50fb1d7af00ff" in text
    assert "labkit snapshot info: full snapshot, format version 1" in text, "the file's sections are not shown"
    assert "rejected: 7 of 7 damaged files" in text and "LOADED (not caught)" not in text
    assert "exit status 2: labkit: corrupt snapshot: damaged.snap: section 'ram' checksum mismatch" in text
    assert "not a labkit snapshot (magic b'MABKSNAP'" in text
    held = re.findall(r"after the first slice each diff held (\d+)(?: to (\d+))? pages of 4096", text)
    # (a slice in which this shared host hardly ran the vCPU may hold fewer: the largest is the working set)
    assert len(held) == 2 and 64 <= int(held[0][1] or held[0][0]) <= 66, \
        f"the small working set's diffs are not its 64 pages: {held}"
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    assert f"memtouch64, 1024 pages, spin 200 on {label}, 16 MiB RAM: the full snapshot (4096 pages)" in text, \
        "the dirty-pages widget did not show its first run"
    assert "extrapolated, not measured" in text, "the 1 GiB value is not labelled as extrapolated"
    assert text.count("migrated output equals an unmigrated run: True") == 2, "a migrated guest's output differs"
    assert "converging" in text and "reached the round limit (3)" in text
    assert len(run.images()) >= 4, f"expected the heat maps, the widget's, cost and migration figures, got {len(run.images())}"
    if backend == "kvm":
        assert "backends run: kvm, emu" in text
        assert "converging (kvm -> emu)" in text and "not converging (emu -> kvm)" in text
        assert f"measured on KVM ({kvm_flavour()})" in text
        assert "no migration between backends" not in text
    else:
        assert "backends run: emu" in text and "backends run: kvm" not in text
        assert "no migration between backends" in text and "converging (emu -> emu)" in text
        assert "measured on the emulator (Unicorn)" in text and "KVM (" not in text
def check_isolation(run: Execution, backend: str, kvm=None) -> None:
    text = run.text()
    assert re.search(r"VM B read \*\*262144 qwords\*\* of its RAM and made \*\*1022 reads\*\* above it", text), \
        "the scan's counts are missing"
    assert "found the secret **0 times**" in text and "**131072 qwords** of A's RAM held it" in text
    assert "counted **0** copies of the secret in B's RAM" in text
    assert "Host mappings overlap: **False**" in text
    assert ("**1 process(es)**" if backend == "kvm" else "**2 process(es)**") in text
    assert "B's scan finds it at **0x123458**" in text, "the positive control did not find the planted secret"
    assert "0x5" in text and "P=1 W/R=0 U/S=1" in text and "P=0 W/R=1 U/S=1" in text, "usertasks64's table"
    assert "kernel: 8 tasks run, 6 killed, still running" in text
    assert "same console on every backend run: True" in text
    healthy = re.search(r"In this run \*\*(\d+) of (\d+)\*\* healthy VMs ended exactly as they do alone", text)
    assert healthy and healthy[1] == healthy[2] == "10", "the containment summary is missing or a healthy VM differed"
    assert re.search(r"wrote \*\*\d+ console bytes\*\* in its budget. A machine's console keeps its first "
                     r"1048576 bytes and only counts the rest \(here \*\*\d+\*\* dropped\)", text), \
        "the console flood's bound is not shown"
    assert re.search(r"ran \*\*\d+\.\d\d s\*\* beside the others and \*\*\d+\.\d{3} s\*\* alone", text), \
        "the noisy-neighbour sentence is missing"
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    assert f"16 VMs on {label} in " in text, "the fault-injection widget did not show its first run"
    assert "so the guest made the host call **host_debug_dump**" in text
    assert "refused **1** byte(s) and kept handler **0**" in text
    assert len(run.images()) >= 4, "expected the scan figure, the status grid, the memory maps and the device state"


def check_backups(run: Execution, backend: str, kvm=None) -> None:
    """Notebook 09's "Backups" section."""
    from labkit.kvm.system import kvm_flavour

    text = run.text()
    label = "KVM (" if backend == "kvm" else "the emulator (Unicorn)"
    assert f"Backend for this section: **{backend}** (measured on {label}" in text
    assert re.search(r"The agent sent \*\*[\d,]+ bytes\*\* \(the metadata and 5 files\) in \*\*11 console chains\*\* "
                     r"after \*\*11 disk reads\*\*", text), "the agent's transfer is not shown"
    assert text.count("all 5 files check out (SHA-256)") >= 2 * 3 + 3, "a backup or a restore did not check out"
    assert re.search(r"and none after: \*\*True\*\*", text), "the VADP backup is not the disk as frozen"
    assert "After **base.raw deleted**, opening the snapshot gives" in text
    assert "does not exist: without it the overlay is useless (a snapshot is not a backup)" in text
    assert "**3 of 3** backups restore to files that check out" in text
    assert "bytes flipped in base.raw's file data" in text, "the widget's first run (corrupt) is not shown"
    assert "SHA-256 differs from the directory's" in text
    assert re.search(r"16 MiB: VADP stopped the VM \*\*\d+ ms\*\*, the cold copy \*\*\d+ ms\*\*; 64 MiB", text)
    assert len(run.images()) >= 1, "the backup figure is missing"
    assert (f"measured on KVM ({kvm_flavour()})" if backend == "kvm" else "measured on the emulator (Unicorn)") in text


def check_exercises(run: Execution, backend: str) -> None:
    """Every autograded exercise cell shows its verdict, passed with the reference answer, run on this backend."""
    graded = [cell for cell in run.notebook.cells if cell.metadata.get("nbgrader", {}).get("grade")]
    text = run.text()
    where = "(run on KVM (" if backend == "kvm" else "(run on the emulator (Unicorn"
    assert text.count("✅ **passed**") == len(graded) and "not yet" not in text, "an exercise's reference answer fails"
    assert text.count(where) == len(graded), f"the exercise verdicts do not say they ran on {backend}"


def check_disks(run: Execution, backend: str, kvm=None) -> None:
    from labkit.kvm.system import kvm_flavour

    text = run.text()
    assert re.search(r"console is the expected checksum\s+True", text), "blk64 did not read back what it wrote"
    assert re.search(r"labkit disk check\s+exit status 0", text) and \
        re.search(r"qemu-img check\s+exit status 0: No errors were found", text), "the overlay does not check clean"
    assert "Every run's guest read back what it wrote: **True**" in text
    grown = re.search(r"the delta is \*\*(\d+) KiB, larger than its (\d+) KiB base\*\*", text)
    assert grown and int(grown[1]) > int(grown[2]), "the sequential delta did not grow past its base"
    assert re.search(r"\*\*random\*\*: after only \d+ KiB of 512-byte writes the delta is already \*\*\d+ KiB\*\*, "
                     r"past the base", text), "the random writes' delta did not pass its base"
    assert "the delta stays at **24 KiB** (1 data cluster)" in text
    assert "labkit's delta files have the size of QEMU's: **True**" in text, "labkit's deltas differ from QEMU's"
    times = re.search(r"Through 8 empty overlays a read took \*\*(\d+) times\*\*", text)
    assert times and int(times[1]) >= 2, "reading through the chain did not cost more than the base"
    label = "KVM" if backend == "kvm" else "emulator (Unicorn)"
    panel = re.search(rf"3 VMs, random writes, 256 KiB free on {re.escape(label)}: (\d+) pause\(s\)", text)
    assert panel and int(panel[1]) >= 1, "the datastore panel's first run did not pause a VM"
    assert "3 of 3 VMs read back everything they wrote, 0 acknowledged sectors lost, every delta checks clean" in text
    assert "committed the stopped VM&#x27;s snapshot" in text and "raised the capacity to" in text
    assert re.search(r"rewrite\s+0\s+none\s+24, 24, 24\s+3 of 3\s+0\s+True", text), "the pattern table is wrong"
    assert "With rewrite the VMs paused **0 times**" in text
    assert len(run.images()) >= 3, f"expected the growth, chain and datastore figures, got {len(run.images())}"
    assert any(cell.cell_type == "markdown" and cell.source.startswith("## Backups") for cell in run.notebook.cells)
    if backend == "kvm":
        assert f"measured on KVM ({kvm_flavour()})" in text
    else:
        assert "measured on the emulator (Unicorn)" in text and "KVM (" not in text


def check_disks_and_backups(run: Execution, backend: str, kvm=None) -> None:
    check_disks(run, backend, kvm)
    check_backups(run, backend, kvm)


CONTENT_CHECKS = {
    "00-welcome.ipynb": check_welcome,
    "01-protection-rings.ipynb": check_rings,
    "02-trap-and-emulate.ipynb": check_trap_and_emulate,
    "03-binary-translation.ipynb": check_binary_translation,
    "04-paravirtualization.ipynb": check_paravirtualization,
    "05-hardware-assisted.ipynb": check_hardware_assisted,
    "06-memory-virtualization.ipynb": check_memory_virtualization,
    "08-snapshots.ipynb": check_snapshots,
    "07-isolation.ipynb": check_isolation,
    "09-disks-and-backups.ipynb": check_disks_and_backups,
}


def test_there_are_notebooks():
    assert [path.name for path in PATHS][:1] == ["00-welcome.ipynb"]


@pytest.mark.unit
@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {index} of {path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_runs_clean(path, backend_name, record_property):
    run = execute_shared(path, backend_name)
    record_property("run_time_s", round(run.seconds, 2))
    assert not run.problems, f"{path.name} on {backend_name}:\n" + "\n".join(run.problems)
    assert run.seconds < MAX_SECONDS, f"{path.name} took {run.seconds:.1f} s on {backend_name} (limit {MAX_SECONDS:g} s)"
    check = CONTENT_CHECKS.get(path.name)
    if check is not None:
        check(run, backend_name)
    check_exercises(run, backend_name)


@pytest.mark.slow
@pytest.mark.emu
@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_runs_clean_without_kvm(path):
    """As on Binder: no usable KVM, LABKIT_BACKEND=emu; the notebooks say why and run on emulation."""
    from labkit.kvm.system import KvmStatus

    run = execute(path, "emu", prelude=WITHOUT_KVM)
    assert not run.problems, f"{path.name} without KVM:\n" + "\n".join(run.problems)
    assert run.seconds < MAX_SECONDS
    assert "kvm_pvm" not in run.text() and NO_KVM in run.text()
    check = CONTENT_CHECKS.get(path.name)
    if check is not None:
        check(run, "emu", KvmStatus(False, NO_KVM, None, "unknown", "/dev/kvm", None))
    check_exercises(run, "emu")
