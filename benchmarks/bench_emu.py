"""Speed of the emulation backend (Unicorn 2.1.4), each against a named baseline.

(a) us per port-I/O exit through ``EmuBackend.run``: a guest doing ``out`` in a
    loop; the dispatcher records a trace tuple and dispatches to a dict of port
    handlers, as labkit's bus does.  Target <= 1.5 us.
(b) million guest instructions per second of a compute loop with no exits,
    against Unicorn alone (a bare ``Uc`` running the same code in the same run).
    Target >= 150 M/s.
(c) us per trap round trip: #GP delivered through the guest's IDT and ``iretq``
    back, from ring 0 and from ring 3 (``cli``).  Target <= 2 us.  Measured with
    labkit's C trap replay (labkit/emu/trap_replay.c, what the backend uses
    where a C compiler is) and with Python delivery only (its fallback), as
    the ratio of the two.  The machine is shared, so the guests are run in
    interleaved rounds and the median over rounds is reported with the min and
    max.  What the mechanism costs before labkit does anything:
    - ``fault_floor_c`` / ``fault_floor``: a bare Unicorn engine whose
      UC_HOOK_INTR only resets ``old_exception`` and moves RIP past the
      instruction in place, in C (fault_floor_hook.c) or as a ctypes Python
      callback: Unicorn's fault path + the cheapest hook, no delivery, no handler;
    - ``handler_iretq``: the same handler and ``iretq`` reached without an
      exception (the guest pushes the frame itself and jumps): an upper bound
      on TCG's side of a round trip, since the six pushes cost too.
    Python round trip - fault_floor - handler_iretq is Python's delivery; C
    round trip - fault_floor_c is the C replay plus the guest's handler.

Run: ``python benchmarks/bench_emu.py [--traps]``; prints a table and writes
``benchmarks/results/emu.json`` (``--traps`` runs only (c) and updates only its
entry).  These are emulator timings on this machine, not hardware exit latencies.
"""

from __future__ import annotations

import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import unicorn
from unicorn import x86_const as X

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkit import Guest, Machine  # noqa: E402
from labkit.emu import EmuBackend  # noqa: E402
from labkit.emu import cpu_state, native, unicorn_backend  # noqa: E402
from labkit.emu.unicorn_backend import HOOK_INTR, _lib  # noqa: E402
from labkit.x86 import layout  # noqa: E402
from labkit.x86.boot import boot_state, load_boot_state  # noqa: E402
from labkit.x86.idt import INTERRUPT_GATE, Gate, encode_gate64  # noqa: E402

ENTRY = layout.LOAD_ADDRESS
MEMORY = 2 << 20
RESULTS = ROOT / "benchmarks" / "results" / "emu.json"


def assemble(source: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "g.s").write_text(f".intel_syntax noprefix\n.code64\n{source}\n")
        subprocess.run(["as", "--64", "-o", path / "g.o", path / "g.s"], check=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(ENTRY), "-e", hex(ENTRY), "-o", path / "g.elf",
                        path / "g.o"], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", path / "g.elf", path / "g.bin"], check=True)
        return (path / "g.bin").read_bytes()


def boot(code: bytes, *, user: bool = False, extra=()) -> EmuBackend:
    backend = EmuBackend(MEMORY, 64)
    load_boot_state(backend, boot_state(64, ENTRY, MEMORY, user=user), code)
    for address, data in extra:
        backend.memory[address:address + len(data)] = data
    return backend


class NoDevices:
    """A dispatcher with nothing on its buses, for the trap benchmark (which makes no I/O until its end)."""

    stop = False

    def pio(self, port, size, is_write, value, rip):
        self.stop = port == layout.DEBUG_EXIT_PORT
        return 0xFF

    def mmio(self, address, size, is_write, value, rip):
        return 0xFF


def best_of(runs: int, fn) -> float:
    return min(fn() for _ in range(runs))


def bench_port_io(n: int = 200_000) -> dict:
    code = assemble(f"""
        mov ecx, {n}
        mov dx, 0x3f8
    1:  out dx, al
        dec ecx
        jnz 1b
        out 0xf4, al
    """)

    def once() -> float:
        # The whole Machine: the backend, MachineCore's dispatch to the UART on the port bus,
        # and the trace; timed by the core itself (the run, not the worker's start-up).
        with Machine(Guest.from_bytes(code, mode=64, name="port-io-loop"), backend="emu") as machine:
            result = machine.run(timeout=30.0)
        assert result.status.kind == "exited" and result.trace.count("IO") == n + 1, result.status
        return result.elapsed_s

    elapsed = best_of(3, once)
    return {"exits": n, "seconds": elapsed, "us_per_exit": elapsed / n * 1e6, "target_us": 1.5,
            "path": "labkit Machine (MachineCore, port bus, UART, trace)"}


COMPUTE = """
    mov ecx, {n}
    xor eax, eax
    mov rsi, 0x20000
1:  add eax, ecx
    imul edx, eax, 7
    xor [rsi], edx
    rol eax, 3
    add rsi, 8
    and rsi, 0x2fff8
    dec ecx
    jnz 1b
    hlt
"""
COMPUTE_BODY = 8  # instructions per iteration


def bench_compute(n: int = 20_000_000) -> dict:
    code = assemble(COMPUTE.format(n=n))
    instructions = n * COMPUTE_BODY

    def backend_once() -> float:
        with Machine(Guest.from_bytes(code, mode=64, name="compute-loop"), backend="emu") as machine:
            result = machine.run(timeout=60.0)
        assert result.status.kind == "halted", result.status
        return result.elapsed_s

    def unicorn_once(timeout_us: int) -> float:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(0, MEMORY)
        uc.mem_write(ENTRY, code)
        uc.reg_write(X.UC_X86_REG_RSP, layout.STACK_TOP)
        started = time.perf_counter()
        uc.emu_start(ENTRY, ENTRY + len(code), timeout=timeout_us)
        return time.perf_counter() - started

    ours = best_of(3, backend_once)
    alone = best_of(3, lambda: unicorn_once(0))
    alone_timed = best_of(3, lambda: unicorn_once(60_000_000))  # Unicorn's watchdog thread polls every ~50 us
    return {"instructions": instructions, "backend_minsn_per_s": instructions / ours / 1e6,
            "unicorn_alone_minsn_per_s": instructions / alone / 1e6,
            "unicorn_alone_with_timeout_minsn_per_s": instructions / alone_timed / 1e6,
            "ratio": alone / ours, "ratio_vs_unicorn_with_timeout": alone_timed / ours,
            "target_minsn_per_s": 150}


class FaultFloor(ctypes.Structure):
    """``struct fault_floor`` of fault_floor_hook.c."""

    _fields_ = [("cpu", ctypes.c_void_p), ("old_exception", ctypes.c_uint32), ("eip", ctypes.c_uint32),
                ("skip", ctypes.c_uint64)]


def _build_floor_hook() -> ctypes.CDLL:
    target = Path(tempfile.mkdtemp()) / "fault_floor_hook.so"
    subprocess.run(["cc", "-O2", "-fPIC", "-shared", "-o", str(target), str(ROOT / "benchmarks" / "fault_floor_hook.c")],
                   check=True)
    return ctypes.CDLL(str(target))


def _fault_floor_once(code: bytes, skip: int, c_hook: ctypes.CDLL | None = None) -> float:
    """Seconds for ``code`` in a bare engine whose UC_HOOK_INTR only resets old_exception and moves RIP.

    The hook is a Python callback, or with ``c_hook`` the C one of fault_floor_hook.c.
    """
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, MEMORY)
    uc.mem_write(ENTRY, code)
    uc.reg_write(X.UC_X86_REG_RSP, layout.STACK_TOP)
    cpu = cpu_state.CpuStateView(uc)
    q, i32 = cpu.q, cpu.i32
    old_exception, eip = cpu.deep.old_exception // 4, cpu_state.EIP // 8

    def on_interrupt(_uc, _vector, _user):
        i32[old_exception] = -1
        q[eip] += skip

    callback = HOOK_INTR(on_interrupt)
    address, data = ctypes.cast(callback, ctypes.c_void_p), None
    if c_hook is not None:
        data = FaultFloor(cpu=cpu.address, old_exception=cpu.deep.old_exception, eip=cpu_state.EIP, skip=skip)
        address = ctypes.cast(c_hook.fault_floor_hook, ctypes.c_void_p)
    hook = ctypes.c_size_t()
    _lib.uc_hook_add(uc._uch, ctypes.byref(hook), ctypes.c_int(unicorn.UC_HOOK_INTR), address,
                     None if data is None else ctypes.byref(data), ctypes.c_uint64(1), ctypes.c_uint64(0))
    started = time.perf_counter()
    uc.emu_start(ENTRY, ENTRY + len(code) - 1)
    elapsed = time.perf_counter() - started
    assert uc.reg_read(X.UC_X86_REG_RCX) == 0
    _lib.uc_hook_del(uc._uch, hook)
    cpu.release()
    del callback
    return elapsed


def bench_traps(n: int = 50_000, rounds: int = 9) -> dict:
    handler = ENTRY + 0x100
    ring0 = assemble(f"""
        mov ecx, {n}
        mov rax, 0x8000000000000000
    1:  mov rbx, [rax]          # non-canonical: #GP(0), 3 bytes
        dec ecx
        jnz 1b
        out 0xf4, al
    .org 0x100
        add rsp, 8
        add qword ptr [rsp], 3
        iretq
    """)
    ring3 = assemble(f"""
        mov ecx, {n}
    1:  cli                     # ring 3: #GP(0), 1 byte
        dec ecx
        jnz 1b
        ud2
    .org 0x100
        add rsp, 8
        add qword ptr [rsp], 1
        iretq
    """)
    no_trap = assemble(f"""
        mov ecx, {n}
    1:  nop
        dec ecx
        jnz 1b
        out 0xf4, al
    """)
    # The ring-0 loop with the #GP replaced by a frame the guest pushes itself (RIP pointing
    # 3 bytes before the return point, as the handler adds 3) and a jump to the handler.
    no_fault = assemble(f"""
        mov ecx, {n}
    1:  mov r8, rsp
        push {layout.KERNEL_DS}
        push r8
        pushfq
        push {layout.KERNEL_CS64}
        lea r9, [rip + 2f - 3]
        push r9
        push 0
        jmp 3f
    2:  dec ecx
        jnz 1b
        out 0xf4, al
    .org 0x100
    3:  add rsp, 8
        add qword ptr [rsp], 3
        iretq
    """)
    bare_nop = assemble(f"mov ecx, {n}\n1: nop\ndec ecx\njnz 1b\nnop")
    # Without paging a bare engine makes no canonical check: #DE (div by zero, 2 bytes) takes the same path.
    bare_fault = assemble(f"mov ecx, {n}\nxor esi, esi\n1: div esi\ndec ecx\njnz 1b\nnop")
    gate = encode_gate64(Gate(offset=handler, selector=layout.KERNEL_CS64, type=INTERRUPT_GATE))
    extra = [(layout.IDT_ADDRESS + 16 * 13, gate)]

    def once(code: bytes, user: bool, c_replay: bool = True) -> float:
        original = unicorn_backend.load_native
        if not c_replay:
            unicorn_backend.load_native = lambda: None
        try:
            backend = boot(code, user=user, extra=extra)
        finally:
            unicorn_backend.load_native = original
        assert (backend._engine.replay is not None) == c_replay, native.status()
        started = time.perf_counter()
        exit_ = backend.run(NoDevices(), 60.0)
        elapsed = time.perf_counter() - started
        assert type(exit_).__name__ in ("Io", "Hlt") and backend.get_regs().rcx == 0, exit_
        backend.close()
        return elapsed

    c_hook = _build_floor_hook()
    per_round: dict[str, list[float]] = {name: [] for name in (
        "ring0", "ring3", "ring0_python", "ring3_python", "fault_floor", "fault_floor_c", "handler_iretq")}
    for _ in range(rounds):
        base = once(no_trap, False)
        per_round["ring0"].append((once(ring0, False) - base) / n * 1e6)
        per_round["ring3"].append((once(ring3, True) - base) / n * 1e6)
        per_round["ring0_python"].append((once(ring0, False, c_replay=False) - base) / n * 1e6)
        per_round["ring3_python"].append((once(ring3, True, c_replay=False) - base) / n * 1e6)
        per_round["handler_iretq"].append((once(no_fault, False) - base) / n * 1e6)
        bare = _fault_floor_once(bare_nop, 0)
        per_round["fault_floor"].append((_fault_floor_once(bare_fault, 2) - bare) / n * 1e6)
        per_round["fault_floor_c"].append((_fault_floor_once(bare_fault, 2, c_hook) - bare) / n * 1e6)
    result: dict = {"traps": n, "rounds": rounds, "target_us": 2.0, "trap_delivery": native.status()}
    for name, values in per_round.items():
        result[f"{name}_us_per_trap"] = statistics.median(values)
        result[f"{name}_us_min_max"] = [min(values), max(values)]
    result["python_delivery_us"] = (result["ring0_python_us_per_trap"] - result["fault_floor_us_per_trap"]
                                    - result["handler_iretq_us_per_trap"])
    result["c_replay_and_guest_handler_us"] = result["ring0_us_per_trap"] - result["fault_floor_c_us_per_trap"]
    result["ratio_python_to_c"] = result["ring0_python_us_per_trap"] / result["ring0_us_per_trap"]
    return result


def _trap_rows(traps: dict) -> list[tuple[str, str, str]]:
    def cell(name: str) -> str:
        low, high = traps[f"{name}_us_min_max"]
        return f"{traps[f'{name}_us_per_trap']:.2f} us ({low:.2f}-{high:.2f})"

    return [
        ("(c) #GP round trip, ring 0 (C trap replay)", cell("ring0"), "<= 2 us"),
        ("    #GP round trip, ring 3 (cli, C trap replay)", cell("ring3"), "<= 2 us"),
        ("    bare Unicorn fault + C no-op hook", cell("fault_floor_c"), "floor"),
        ("    leaves for the C replay + guest handler", f"{traps['c_replay_and_guest_handler_us']:.2f} us", ""),
        ("    #GP round trip, ring 0, Python only", cell("ring0_python"),
         f"{traps['ratio_python_to_c']:.1f}x the C replay"),
        ("    #GP round trip, ring 3, Python only", cell("ring3_python"), ""),
        ("    bare Unicorn fault + Python no-op hook", cell("fault_floor"), "floor"),
        ("    guest pushes a frame, handler + iretq", cell("handler_iretq"), "no fault"),
        ("    leaves for Python's delivery (ring 0)", f"{traps['python_delivery_us']:.2f} us", ""),
    ]


def _print(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'result':>26}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>26}  {target}")


def main() -> None:
    if "--traps" in sys.argv[1:]:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.update({"machine": platform.platform(), "python": platform.python_version(),
                        "unicorn": unicorn.__version__, "traps": bench_traps()})
        _print(_trap_rows(results["traps"]))
    else:
        results = {
            "machine": platform.platform(), "python": platform.python_version(), "unicorn": unicorn.__version__,
            "port_io": bench_port_io(), "compute": bench_compute(), "traps": bench_traps(),
        }
        _print([
            ("(a) port-I/O exit through run()", f"{results['port_io']['us_per_exit']:.2f} us", "<= 1.5 us"),
            ("(b) compute, EmuBackend", f"{results['compute']['backend_minsn_per_s']:.0f} M insn/s", ">= 150 M/s"),
            ("    compute, Unicorn alone", f"{results['compute']['unicorn_alone_minsn_per_s']:.0f} M insn/s",
             f"ratio {results['compute']['ratio']:.2f}"),
            ("    compute, Unicorn alone + timeout",
             f"{results['compute']['unicorn_alone_with_timeout_minsn_per_s']:.0f} M insn/s",
             f"ratio {results['compute']['ratio_vs_unicorn_with_timeout']:.2f}"),
            *_trap_rows(results["traps"]),
        ])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
