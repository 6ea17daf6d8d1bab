"""The simulation engine's instruction loop asks only the nodes that have an instruction waiting."""

import threading
from queue import Queue
from types import SimpleNamespace

from qfl.simulations.flower_polling import add_messages_to_queue, node_polling


class FakeState:
    """Flower's in-memory link state as the loop sees it: a store of instructions and ``get_message_ins``."""

    def __init__(self, waiting_for: list[int], delivered_to: list[int], stop: threading.Event) -> None:
        self.asked: list[int] = []
        self.stop = stop
        self.message_ins_store = {
            f"m{node}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for node in waiting_for
        }
        for node in delivered_to:
            self.message_ins_store[f"d{node}"] = SimpleNamespace(
                metadata=SimpleNamespace(dst_node_id=node, delivered_at="2026-12-06T00:00:00"))

    def get_message_ins(self, node_id: int, limit: int) -> list:
        self.asked.append(node_id)
        message = self.message_ins_store[f"m{node_id}"]
        message.metadata.delivered_at = "now"  # Flower marks what it hands out
        if all(m.metadata.delivered_at for m in self.message_ins_store.values()):
            self.stop.set()
        return [message]


def test_only_nodes_with_an_undelivered_instruction_are_asked_in_registration_order():
    stop = threading.Event()
    state = FakeState(waiting_for=[7, 3], delivered_to=[5], stop=stop)
    queue: Queue = Queue()
    add_messages_to_queue(state, queue, {node: None for node in range(1000)}, stop)
    assert state.asked == [3, 7]  # not the 998 others, not node 5 whose instruction was handed out already
    assert [queue.get_nowait().metadata.dst_node_id for _ in range(2)] == [3, 7] and queue.empty()


def test_the_loop_is_flowers_again_after_the_run():
    from flwr.server.superlink.fleet.vce import vce_api

    flowers = vce_api.add_messages_to_queue
    with node_polling():
        assert vce_api.add_messages_to_queue is add_messages_to_queue
        with node_polling():  # nested runs put back what they found
            assert vce_api.add_messages_to_queue is add_messages_to_queue
        assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert vce_api.add_messages_to_queue is flowers
