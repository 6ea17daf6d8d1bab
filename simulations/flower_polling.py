"""Flower 1.41's simulation engine, polled per waiting node instead of per registered node.

Flower's ``vce_api.add_messages_to_queue`` hands instructions to the simulated
nodes: every 0.1 s it calls ``state.get_message_ins(node_id, limit=1)`` for
*each* of the ``n`` registered nodes, and each call scans every stored
instruction (checking expiry and federation on each). A sweep costs O(n·m) for
``m`` stored instructions and repeats for as long as a round holds any, that
is, until every reply is in. At ``clients = 1000``, ``fraction = 0.1``
(m ≈ 100) that kept about one of two cores busy: half of the driver's samples
in a py-spy profile of a masked round.

:func:`add_messages_to_queue` below keeps Flower's contract and its own
``get_message_ins`` (delivery marks, expiry, federation checks); it only asks
for the nodes that have an undelivered instruction, found in one pass over the
store: O(n + m) a sweep, plus Flower's scan for each waiting node. Nodes are
asked in the registration order, as Flower does. :func:`node_polling` installs
it for the duration of a run and puts Flower's back afterwards; a link state
without an in-memory store falls back to Flower's loop. One difference: Flower's
sweep also re-checked instructions already handed out (deleting those past their
TTL); this loop leaves them to the reply side, which checks each reply's
instruction when the ServerApp pulls it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from queue import Queue
from typing import Any


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, Any],
                          f_stop: threading.Event) -> None:
    """Put each waiting node's next instruction in ``queue`` every 0.1 s until ``f_stop`` is set."""
    store = getattr(state, "message_ins_store", None)
    if not isinstance(store, dict):
        return (_flowers_loop or _vce_api().add_messages_to_queue)(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        waiting = {m.metadata.dst_node_id for m in list(store.values()) if m.metadata.delivered_at == ""}
        if waiting:
            for node_id in nodes_mapping:
                if node_id in waiting:
                    for message in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(message)
        f_stop.wait(0.1)


def _vce_api() -> Any:
    from flwr.server.superlink.fleet.vce import vce_api

    return vce_api


_flowers_loop: Any = None  # Flower's own add_messages_to_queue, kept by node_polling for the fallback


@contextlib.contextmanager
def node_polling() -> Iterator[None]:
    """Run the simulation engine with :func:`add_messages_to_queue` in place of Flower's loop (nesting is safe:
    each exit puts back what its entry found)."""
    global _flowers_loop
    vce_api = _vce_api()
    previous = vce_api.add_messages_to_queue
    if previous is not add_messages_to_queue:
        _flowers_loop = previous
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = previous
