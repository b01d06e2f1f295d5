"""Protection rings: the ``rings64`` guest kernel, its ring-transition events, and #PF error codes.

    >>> from labkit.rings import run_rings, ring_events
    >>> result = run_rings(backend="emu")
    >>> [event.label for event in ring_events(result.trace)][:3]
    ['kernel start', 'return to ring 3', 'int 0x80 from ring 3']

See :mod:`labkit.rings.events` for how the kernel reports, and
:func:`labkit.viz.ring_timeline` for the figure.
"""

from labkit.rings.events import (EVENT_BASE, EVENT_SIZE, EventSink, RingEvent, decode_page_fault_error,
                                 instruction_of, ring_events, rings_guest, rings_machine, run_rings)

__all__ = ["EVENT_BASE", "EVENT_SIZE", "EventSink", "RingEvent", "decode_page_fault_error", "instruction_of", "ring_events",
           "rings_guest", "rings_machine", "run_rings"]
