"""The translator of binary translation on its own: guest code in a bytearray, no backend."""

from __future__ import annotations

import struct

import pytest

from labkit import assemble
from labkit.errors import ConfigError
from labkit.memory import GuestMemory
from labkit.monitor.binary_translation import TRANSLATABLE, BinaryTranslator
from labkit.monitor.translation_cache import EXIT_STUB_SIZE, SENSITIVE, CacheFull, TranslationCache
from labkit.x86.disasm import disassemble

pytestmark = pytest.mark.unit

RAM = 0x200000
BASE = 0x1C0000
LOAD = 0x8000


def cache_for(source: str, *, sensitive=TRANSLATABLE, size=0x40000, returns=None):
    code = assemble(source, 64, LOAD)
    ram = bytearray(RAM)
    ram[LOAD:LOAD + len(code)] = code

    memory = GuestMemory([(0, memoryview(ram), False)])
    cache = TranslationCache(BASE, size, memory, memory.write, sensitive, returns=returns)
    return cache, ram


def listing(ram, start, end):
    return [text for _, _, text in disassemble(bytes(ram[start:end]), start, 64)]


def test_sensitive_instructions_become_monitor_entries_and_the_rest_is_copied():
    cache, ram = cache_for("mov eax, 1\ncli\nadd eax, 2\npushfq\npopfq\nsgdt [rbx]\nhlt\n")
    block = cache.translate(LOAD)
    sites = sorted(cache.sites.values(), key=lambda site: site.address)
    assert [site.text for site in sites if site.kind == "sensitive"] == ["cli", "pushfq", "popfq",
                                                                          "sgdt [rbx]", "hlt"]
    assert all(ram[site.address] == 0xCC for site in sites)
    assert listing(ram, block.cache_start, block.cache_start + 9) == ["mov eax, 1", "int3", "add eax, 2"]
    cli = next(site for site in sites if site.text == "cli")
    assert (cli.guest_rip, cli.guest_next) == (LOAD + 5, LOAD + 6)


def test_a_left_out_instruction_is_copied_and_runs_natively():
    cache, ram = cache_for("cli\npopfq\nhlt\n", sensitive=TRANSLATABLE - {"popfq"})
    block = cache.translate(LOAD)
    assert ram[block.cache_start:block.cache_start + 2] == b"\xcc\x9d"  # cli -> int3, popfq copied


def test_rip_relative_operands_still_reach_the_guests_data():
    cache, ram = cache_for("mov rax, [rip + data]\nlea rbx, [rip + data]\nhlt\ndata: .quad 7\n")
    block = cache.translate(LOAD)
    data = LOAD + 7 + 7 + 1  # after mov, lea and hlt
    texts = listing(ram, block.cache_start, block.cache_start + 14)
    for text, at in zip(texts, (block.cache_start, block.cache_start + 7)):
        displacement = int(text.split("rip ")[1].rstrip("]").replace(" ", ""), 16)
        assert at + 7 + displacement == data, text


def test_a_conditional_branch_ends_the_block_with_two_exits_and_chaining_writes_only_the_slot():
    cache, ram = cache_for("top: dec ecx\njnz top\nhlt\n")
    block = cache.translate(LOAD)
    exits = sorted((site for site in cache.sites.values() if site.kind == "exit"), key=lambda site: site.address)
    assert [site.target for site in exits] == [LOAD + 4, LOAD]  # not taken first, then taken
    jcc = block.translated[1]
    assert jcc[1][:2] == b"\x0f\x85" and struct.unpack("<i", jcc[1][2:])[0] == EXIT_STUB_SIZE
    code_before = bytes(ram[block.cache_start:block.cache_end])
    cache.chain(exits[1], block.cache_start)
    after = bytes(ram[block.cache_start:block.cache_end])
    changed = [index for index in range(len(after)) if after[index] != code_before[index]]
    slot = exits[1].slot - block.cache_start
    assert changed and all(slot <= index < slot + 8 for index in changed)
    assert struct.unpack_from("<Q", ram, exits[1].slot)[0] == block.cache_start


def test_call_pushes_the_guests_return_address_not_the_caches():
    cache, ram = cache_for("call sub\nhlt\nsub: ret\n")
    block = cache.translate(LOAD)
    assert block.translated[0][1] == b"\x68" + struct.pack("<i", LOAD + 5)
    exit_site, = (site for site in cache.sites.values() if site.kind == "exit")
    assert exit_site.target == LOAD + 6


def test_ret_looks_up_the_return_table_inline_and_blocks_fill_it():
    cache, ram = cache_for("call sub\nhlt\nsub: ret\n", returns=(LOAD, 0x100))
    cache.translate(LOAD + 6)  # sub: ret
    assert "int3" not in listing(ram, cache.blocks[LOAD + 6].cache_start, cache.blocks[LOAD + 6].cache_start + 1)
    assert any(site.kind == "indirect" and site.text == "ret" for site in cache.sites.values())
    assert struct.unpack_from("<Q", ram, BASE + 8 * 6)[0] == cache.blocks[LOAD + 6].cache_start
    assert struct.unpack_from("<Q", ram, BASE + 8 * 5)[0] == 0  # not translated yet: a miss
    assert cache.inline_return_hits() == 0


def test_fault_addresses_map_back_to_the_guest_instruction():
    cache, _ = cache_for("nop\nmov rax, [rbx]\ncli\njmp $\n")
    block = cache.translate(LOAD)
    for at, _, _, guest in block.translated:
        assert cache.guest_address(at) == guest
    assert cache.guest_address(block.translated[1][0]) == LOAD + 1
    assert cache.guest_address(BASE - 1) is None


def test_undecodable_bytes_become_an_invalid_site():
    cache, _ = cache_for(".byte 0x06\n")  # push es: invalid in 64-bit mode
    cache.translate(LOAD)
    assert [site.kind for site in cache.sites.values()] == ["invalid"]


def test_a_full_cache_says_so():
    cache, _ = cache_for("\n".join(["nop"] * 100) + "\nhlt\n", size=0x50)
    with pytest.raises(CacheFull, match="full"):
        block = cache.translate(LOAD)
        cache.translate(block.guest_end)


def test_the_default_set_covers_the_papers_instructions():
    assert {"pushfq", "popfq", "sgdt", "sidt", "smsw", "cli", "sti", "in", "out", "hlt", "iretq"} <= SENSITIVE


def test_translator_arguments_are_checked():
    from labkit import Guest

    kernel = Guest.from_bytes(b"\xfa\xf4", mode=64)
    with pytest.raises(ConfigError, match="cannot translate"):
        BinaryTranslator(kernel, translate={"cli", "frobnicate"})
    with pytest.raises(ConfigError, match="64-bit"):
        BinaryTranslator(Guest.from_bytes(b"\xf4", mode=32))
    translator = BinaryTranslator(kernel)
    assert translator.guest.code == b"\xcc\xf4" and translator.guest.user


# -- self-modifying code and the segment instructions -----------------------------------------------

def test_the_segment_instructions_of_robin_and_irvine_become_monitor_entries():
    source = ("mov eax, cs\nmov ds, ecx\npush fs\npop gs\nlar eax, ecx\nlsl eax, ecx\nverr cx\nverw cx\n"
              "mov word ptr [rbx], ss\ncall fword ptr [rbx]\n")
    cache, ram = cache_for(source)
    cache.translate(LOAD)
    texts = [site.text for site in sorted(cache.sites.values(), key=lambda site: site.address)
             if site.kind == "sensitive"]
    assert texts == ["mov eax, cs", "mov ds, ecx", "push fs", "pop gs", "lar eax, ecx", "lsl eax, ecx", "verr cx",
                     "verw cx", "mov word ptr [rbx], ss", "call ptr [rbx]"]  # Capstone's name for FF /3 (far)


def test_leaving_sreg_out_copies_the_segment_moves():
    cache, ram = cache_for("mov eax, cs\nmov eax, ebx\nhlt\n", sensitive=TRANSLATABLE - {"sreg"})
    block = cache.translate(LOAD)
    assert bytes(ram[block.cache_start:block.cache_start + 2]) == b"\x8c\xc8"  # copied, runs natively


def test_an_invalidated_block_is_unreachable_and_translated_afresh():
    cache, ram = cache_for("start: jmp next\nnext: mov eax, 1\nret\n", returns=(LOAD, 0x100))
    first = cache.translate(LOAD)
    target = cache.translate(LOAD + 2)
    exit_site = next(site for site in cache.sites.values() if site.kind == "exit" and site.guest_rip == LOAD)
    cache.chain(exit_site, target.cache_start)
    table_entry = BASE + 8 * 2
    assert struct.unpack_from("<Q", ram, table_entry)[0] == target.cache_start
    assert cache.stale(LOAD, LOAD + 0x100) == []
    ram[LOAD + 3] = 2  # the guest patches "mov eax, 1" to "mov eax, 2"
    assert cache.stale(LOAD, LOAD + 0x100) == [target]
    cache.invalidate(target)
    assert not target.valid and cache.lookup(LOAD + 2) is None and cache.invalidated == 1
    assert struct.unpack_from("<Q", ram, table_entry)[0] == 0  # the return table forgets it
    assert struct.unpack_from("<Q", ram, exit_site.slot)[0] == exit_site.address  # unchained: back to its int3
    again = cache.translate(LOAD + 2)
    assert again is not target and again.original[0][2] == "mov eax, 2"
    assert first.valid


def test_a_one_shot_translation_always_ends_in_a_monitor_entry():
    cache, ram = cache_for("add byte ptr [rbx], 1\nret\n", returns=(LOAD, 0x100))
    shot = cache.one_shot(LOAD)
    assert shot.one_shot and len(shot.original) == 1 and cache.lookup(LOAD) is None
    exit_site = next(site for site in cache.sites.values() if cache.site_blocks[site.address] is shot)
    assert exit_site.kind == "exit" and exit_site.target == LOAD + 3
    assert cache.one_shot(LOAD) is shot  # reused while the guest's bytes are the same
    ret = cache.one_shot(LOAD + 3)
    assert [site.kind for site in cache.sites.values() if cache.site_blocks[site.address] is ret] == ["indirect"]
