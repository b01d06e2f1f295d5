# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# ## What KVM handles itself
#
# A VMM like labkit sits in userspace: it calls `KVM_RUN` and sees only the exits KVM hands back
# (a port write, an MMIO access, a `hlt`, ...). Many more things happen inside the kernel that labkit
# never sees: KVM handles some exits itself, emulates instructions, takes host interrupts. KVM counts
# them per vCPU, and since Linux 5.14 it publishes the counters in a **binary stats file descriptor**
# (`KVM_GET_STATS_FD`). labkit reads it before and after a run (`result.kvm_stats`) and puts it beside
# the exits its own run loop saw.
#
# On the emulator there is no KVM, so none of this exists there: the cells below say so instead of
# showing numbers.

# %%
%matplotlib inline
from IPython.display import Markdown, display

from labkit.viz import kvm_stats
from labkit.widgets.kvm_controls import kvm_here

KVM, WHY = kvm_here()
if KVM:
    from labkit.kvm.system import kvm_flavour

    display(Markdown(f"This session runs on **KVM** (`{kvm_flavour()}`): {WHY}."))
else:
    display(Markdown(f"**No KVM in this session** ({WHY}). {kvm_stats.kvm_absent_reason('emu')}. "
                     "The cells of this section show nothing else."))

# %% [markdown]
# ### One guest, counted twice
#
# The guest below prints a line through the UART (one `out` per character), reads and writes the MSR
# `IA32_KERNEL_GS_BASE` in a loop, writes to an MMIO device above RAM, and notifies queue 0 on the
# virtqueue notify port `0xF6`, then halts. It runs in ring 0.

# %%
display(Markdown("```\n" + kvm_stats.EXIT_MIX_SOURCE + "```"))
if KVM:
    mix = kvm_stats.run_exit_mix()
    display(kvm_stats.counter_table(mix.result))
    display(kvm_stats.kernel_vs_userspace(mix.result))

# %% [markdown]
# Read the table row by row: *exits labkit saw* are returns of `KVM_RUN`; *KVM counted* is the vCPU
# counter; *handled in the kernel* is the difference. Which counter counts what depends on how the
# host's KVM runs the guest, which is the next question.

# %% [markdown]
# ### Which KVM is this?
#
# On a laptop or a lab PC, KVM uses the CPU's virtualization extensions (`kvm_intel`: VT-x, `kvm_amd`:
# AMD-V): the CPU runs the guest kernel itself and leaves guest mode only for what KVM asked it to
# intercept. Many cloud machines cannot offer that to their own guests, and run **PVM** (`kvm_pvm`)
# instead: a hypervisor made of page tables and ring 3, no VT-x needed. The numbers of this run tell
# which one you have.

# %%
if KVM:
    display(Markdown(kvm_stats.flavour_explanation(mix.result, kvm_stats.exit_mix_instructions())))
    from labkit import Machine

    with Machine("compute64", backend="kvm") as machine:
        ring3 = machine.run(timeout=20.0)
    steps = ring3.console.strip().splitlines()[-1]
    counters = ring3.kvm_stats.counters
    display(Markdown(
        f"For contrast, `compute64` computes in **ring 3** (`{steps}`) and uses ring 0 only for its services: "
        f"`insn_emulation` grew by **{counters['insn_emulation']}** for that whole run, and KVM counted "
        f"**{counters['exits']}** exits against **{ring3.kvm_stats.userspace_total}** that reached labkit "
        f"(the rest: ring switches and page faults KVM handled itself, `pf_taken` = **{counters['pf_taken']}**)."))
    display(kvm_stats.counter_table(ring3, "compute64: ring-3 code, counted by KVM and by labkit"))

# %% [markdown]
# ### How long does one exit take?
#
# labkit times every exit from the end of handling the previous one to the end of handling this one:
# the guest's run up to the exit, KVM's exit and re-entry and labkit's own handling. The histograms show
# that round trip per exit reason, for the run above.

# %%
if KVM:
    display(kvm_stats.exit_latency(mix.result))

# %% [markdown]
# ### KVM's exit controls
#
# A VMM can tell KVM to keep more in the kernel, or to send more to userspace. labkit offers four of
# KVM's controls, per machine: `Machine(guest, backend="kvm", kvm_controls=KvmExitControls(...))`
# (the emulator refuses them with a `ConfigError`).
#
# | control | KVM interface | what it changes |
# |---|---|---|
# | HLT stays in the guest | `KVM_CAP_X86_DISABLE_EXITS` | on VT-x/AMD-V the CPU stops intercepting `hlt` |
# | MSRs to userspace | `KVM_CAP_X86_USER_SPACE_MSR` + `KVM_X86_SET_MSR_FILTER` | a filtered `rdmsr`/`wrmsr` exits to labkit, which answers it |
# | coalesced PIO/MMIO | `KVM_REGISTER_COALESCED_MMIO` | writes go into a ring page, no exit each; labkit drains it in order |
# | ioeventfd | `KVM_IOEVENTFD` | a write of the queue index to the notify port signals an eventfd in the kernel |
#
# Every write KVM keeps in the kernel still reaches labkit's device: at the next exit labkit drains the
# coalesced ring and reads the eventfds before handling that exit. Below, the same guest runs once without
# controls and once with each control alone.

# %%
if KVM:
    effects = kvm_stats.compare_controls()
    display(kvm_stats.control_table(effects))
    display(kvm_stats.control_effects(effects))
    by_name = {effect.names[0]: effect for effect in effects}
    hlt = by_name["hlt"]
    if hlt.after.stats.flavour == "kvm_pvm":
        display(Markdown(
            f"Under PVM the HLT control is accepted and changes nothing: `halt_exits` "
            f"**{hlt.before.stats['halt_exits']}** without, **{hlt.after.stats['halt_exits']}** with. "
            "The guest's ring-0 `hlt` never runs on the CPU in a guest mode, so there is no intercept to switch "
            "off; KVM's emulator executes it and, with no interrupt controller in the kernel, hands it to labkit."))
    else:
        display(Markdown(f"With the HLT control the vCPU halts inside the guest: status "
                         f"**{hlt.after.result.status}**, `halt_exits` **{hlt.after.stats['halt_exits']}**."))
    fd = by_name["ioeventfd"]
    display(Markdown(
        f"With the ioeventfd, **{fd.after.stats.delivered['ioeventfd']}** notifications stayed in the kernel "
        f"and labkit saw **{fd.after.stats.userspace.get('IO', 0)}** port exits instead of "
        f"**{fd.before.stats.userspace.get('IO', 0)}**. KVM still executed every `out`: `insn_emulation` "
        f"**{fd.before.stats['insn_emulation']}** without, **{fd.after.stats['insn_emulation']}** with; "
        f"`io_exits` **{fd.before.stats['io_exits']}** without, **{fd.after.stats['io_exits']}** with."))

# %% [markdown]
# ### A doorbell rung from ring 3
#
# Under PVM the ring-0 `out` above never was a VM exit: KVM's emulator executed it, so with the ioeventfd
# nothing at all leaves the kernel. Code in ring 3 runs natively, though, and a store to a doorbell page
# above RAM faults into KVM: a real exit. The next guest rings an MMIO doorbell from ring 3 (and ends with
# `ud2`, which labkit's default handler reports as #UD), once without and once with an ioeventfd on it.

# %%
if KVM:
    display(Markdown("```\n" + kvm_stats.RING3_DOORBELL_SOURCE + "```"))
    without_fd, with_fd = kvm_stats.ring3_doorbell(False), kvm_stats.ring3_doorbell(True)
    display(kvm_stats.doorbell_table(without_fd, with_fd))
    display(Markdown(
        f"With the ioeventfd no doorbell write reached labkit as an exit "
        f"(**{with_fd.kvm_stats.userspace.get('MMIO', 0)}** MMIO exits), yet KVM counted "
        f"**{with_fd.kvm_stats['exits']}** exits, as many as without it (**{without_fd.kvm_stats['exits']}**): "
        "the kernel still takes each exit and handles it itself; only the trip to userspace is gone."))

# %% [markdown]
# ### Try it
#
# Tick any combination of controls and run again: the table and the figure compare the guest with
# those controls to the same guest without any.

# %%
from labkit.widgets.kvm_controls import KvmControls

KvmControls()
