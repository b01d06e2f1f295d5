"""Pure x86 helpers shared by both backends: CPU state, descriptor tables, page tables, boot set-up."""
