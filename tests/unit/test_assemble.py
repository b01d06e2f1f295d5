"""labkit.assembler: GNU as pipeline, error messages, and the shipped binaries rebuilding byte for byte."""

from __future__ import annotations


import capstone
import pytest

import labkit.assembler as assemble_module
from labkit.assembler import assemble, binutils_version, build_guests, have_binutils
from labkit.errors import AssemblyError, ConfigError
from labkit.guest import guests_dir, load_manifest

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not have_binutils(), reason="GNU binutils (as, ld, objcopy) is not installed"),
]


def test_absolute_memory_operand_is_not_rip_relative():
    """The reason Keystone is banned: [0x3000] must be an absolute address in 64-bit mode."""
    code = assemble("mov rbx, [0x3000]", 64)
    assert code == bytes.fromhex("488b1c2500300000")  # ModRM 0x1C + SIB 0x25: disp32, no base
    instruction = next(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(code, 0x8000))
    assert instruction.op_str == "rbx, qword ptr [0x3000]"


@pytest.mark.parametrize(
    "mode,source,expected",
    [
        (16, "mov ax, [message]\nmessage: .byte 1", bytes.fromhex("a1038001")),
        (32, "mov eax, [message]\nmessage: .byte 1", bytes.fromhex("a10580000001")),
        (64, "lea rdi, [rip + message]\nmessage: .byte 1", bytes.fromhex("488d3d0000000001")),
    ],
)
def test_modes_and_load_address(mode, source, expected):
    assert assemble(source, mode) == expected


def test_load_address_moves_absolute_references():
    code = assemble("mov eax, offset here\nhere: nop", 32, load_address=0x10000)
    assert code == bytes.fromhex("b80500010090")


def test_data_and_bss_follow_the_code_in_one_image():
    code = assemble(".data\nvalue: .byte 7\n.text\nmov eax, [value]\n.bss\nspace: .skip 4", 32)
    assert code == bytes.fromhex("a105800000") + b"\x07" + bytes(4)


def test_deterministic():
    source = "mov rax, 1\nhlt\n.ascii \"x\""
    assert assemble(source, 64) == assemble(source, 64)


def test_syntax_error_names_the_users_line():
    with pytest.raises(AssemblyError) as caught:
        assemble("nop\nnop\nfrobnicate eax\n", 64)
    message = str(caught.value)
    assert "line 3:" in message and "frobnicate" in message
    assert "guest.S" not in message


def test_undefined_symbol_is_reported():
    with pytest.raises(AssemblyError, match="undefined reference to `nowhere'"):
        assemble("jmp nowhere", 64)


def test_bad_mode():
    with pytest.raises(ConfigError):
        assemble("nop", 8)


def test_missing_binutils_says_how_to_install(monkeypatch):
    assemble_module._tools.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        with pytest.raises(AssemblyError, match="apt install binutils"):
            assemble("nop", 64)
    finally:
        assemble_module._tools.cache_clear()


def test_binutils_version():
    version = binutils_version()
    assert version[0].isdigit() and "." in version


def test_shipped_binaries_rebuild_byte_identical(tmp_path):
    written = build_guests(tmp_path)
    assert len(written) == len(load_manifest()) >= 10
    for path in written:
        committed = (guests_dir() / path.name).read_bytes()
        assert path.read_bytes() == committed, f"{path.name} differs: run python -m labkit.assembler --build-guests"


def test_every_shipped_source_starts_with_a_comment():
    for entry in load_manifest():
        first = (guests_dir() / entry["source"]).read_text().lstrip().splitlines()[0]
        assert first.startswith("# " + entry["name"] + ":"), entry["source"]


def test_cli_assembles_a_file(tmp_path, capsys):
    source = tmp_path / "tiny.S"
    source.write_text("hlt\n")
    assert assemble_module.main([str(source), "--mode", "32"]) == 0
    assert (tmp_path / "tiny.bin").read_bytes() == b"\xf4"
    bad = tmp_path / "bad.S"
    bad.write_text("nope\n")
    assert assemble_module.main([str(bad)]) == 1
    assert "line 1:" in capsys.readouterr().err


def test_an_error_in_spliced_text_names_its_own_line_and_quotes_it():
    from labkit.assembler import assemble, splice

    template = "nop\nnop\n# >>> here\nhlt\n"
    start = template.index("# >>> here")
    source, insertion = splice(template, start, start + len("# >>> here"), "mov eax, 1\nmovv eax, 2", "your routine")
    assert source == "nop\nnop\nmov eax, 1\nmovv eax, 2\nhlt\n"
    assert (insertion.first_line, insertion.lines) == (3, ("mov eax, 1", "movv eax, 2"))
    with pytest.raises(AssemblyError) as caught:
        assemble(source, 64, insertion=insertion)
    assert str(caught.value).splitlines()[1:] == ["your routine, line 2: Error: no such instruction: `movv eax,2'",
                                                  "    movv eax, 2"]


def test_an_undefined_symbol_names_the_line_that_uses_it():
    with pytest.raises(AssemblyError) as caught:
        assemble("nop\njmp nowhere\n", 64)
    message = str(caught.value)
    assert "line 2: undefined reference to `nowhere'" in message and "RWX" not in message


def test_a_students_routine_error_points_at_the_students_line_not_the_kernels():
    from labkit.monitor.trap_emulate import minikernel
    from labkit.rings import rings_guest

    with pytest.raises(AssemblyError) as caught:
        minikernel(student="movv eax, 1")
    assert str(caught.value) == "as failed:\nyour routine, line 1: Error: no such instruction: `movv eax,1'\n    movv eax, 1"
    with pytest.raises(AssemblyError) as caught:
        minikernel(student="mov eax, 1\njmp nowhere")
    assert str(caught.value) == "ld failed:\nyour routine, line 2: undefined reference to `nowhere'\n    jmp nowhere"
    with pytest.raises(AssemblyError) as caught:
        rings_guest("nop\nlea r15, [rip + 1f]\nmov rax, [nowhere\n1:")
    assert "your task, line 3: Error:" in str(caught.value) and "    mov rax, [nowhere" in str(caught.value)


def test_splice_checks_what_it_is_given():
    from labkit.assembler import splice

    with pytest.raises(ConfigError, match="your routine must be assembly source text"):
        splice("nop\n", 0, 0, b"nop", "your routine")
    with pytest.raises(ConfigError, match="cannot splice at 3:1"):
        splice("nop\n", 3, 1, "nop", "x")


def include_symbols(name: str) -> dict[str, int]:
    """The ``.equ`` symbols of ``guests/include/NAME`` with their values (each a number there)."""
    from labkit.assembler import include_dir

    symbols = {}
    for line in (include_dir() / name).read_text().splitlines():
        if line.strip().startswith(".equ "):
            symbol, value = line.strip()[len(".equ "):].split("#")[0].split(",")
            symbols[symbol.strip()] = int(value.strip(), 0)
    return symbols


def test_the_shared_pic_and_pit_ports_are_where_the_machine_puts_its_models():
    from labkit.vmm.devices.timer import PIT_PORT
    from labkit.vmm.interrupts import MASTER_PORT

    symbols = include_symbols("pic_pit.inc")
    assert (symbols["PIC_COMMAND"], symbols["PIC_DATA"]) == (MASTER_PORT, MASTER_PORT + 1)
    assert (symbols["PIT_COUNTER0"], symbols["PIT_CONTROL"]) == (PIT_PORT, PIT_PORT + 3)


def test_the_shared_virtio_symbols_are_the_device_models_values():
    """guests/include/virtio_mmio.inc against labkit.virtio.transport: the guests' drivers and the device agree."""
    from labkit.virtio import transport

    symbols = include_symbols("virtio_mmio.inc")
    expected = {f"R_{name}": getattr(transport, name) for name in (
        "MAGIC", "VERSION", "DEVICE_ID", "DEVICE_FEATURES", "DEVICE_FEATURES_SEL", "DRIVER_FEATURES",
        "DRIVER_FEATURES_SEL", "QUEUE_SEL", "QUEUE_SIZE_MAX", "QUEUE_SIZE", "QUEUE_READY", "STATUS",
        "QUEUE_DESC_LOW", "QUEUE_DESC_HIGH", "QUEUE_DRIVER_LOW", "QUEUE_DRIVER_HIGH", "QUEUE_DEVICE_LOW",
        "QUEUE_DEVICE_HIGH")}
    expected |= {"R_CAPACITY_LOW": transport.CONFIG, "R_CAPACITY_HIGH": transport.CONFIG + 4,
                 "ACKNOWLEDGE": transport.STATUS_ACKNOWLEDGE, "DRIVER": transport.STATUS_DRIVER,
                 "DRIVER_OK": transport.STATUS_DRIVER_OK, "FEATURES_OK": transport.STATUS_FEATURES_OK,
                 "NEEDS_RESET": transport.STATUS_DEVICE_NEEDS_RESET}
    assert symbols == expected


def test_any_source_may_include_the_shared_routines_and_a_missing_one_is_named():
    from labkit.assembler import include_dir

    for include in include_dir().glob("*.inc"):
        assert include.read_text().startswith(f"# {include.name}:"), include
    code = assemble('.equ COM1, 0x3F8\n.equ LSR, COM1 + 5\n.equ LSR_THRE, 0x20\n'
                    'lea rsi, [rip + hi]\ncall puts\nhlt\n.include "uart_print.inc"\nhi: .asciz "hi"', 64)
    assert b"\xec" in code and b"\xee" in code and code.endswith(b"hi\x00")  # in al, dx; out dx, al
    with pytest.raises(AssemblyError, match="no_such.inc"):
        assemble('.include "no_such.inc"', 64)
