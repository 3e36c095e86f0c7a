"""An in-process Flower Grid: `slm federate simulate` runs the same ServerApp and ClientApp objects a deployment runs,
with every client in this process, one after the other (2 CPU cores gain nothing from running them in parallel).

Flower 1.42's own simulation engine (`run_simulation`, deprecated there) needs Ray (~220 MB) and forwards no run
configuration; a Grid is Flower's public interface between a ServerApp and the nodes, so implementing it is the
supported way to drive the apps directly. Messages are deep-copied in both directions, as the wire would: a
ClientApp can neither see nor change the server's objects. A client listed in `down` never answers (a dropped node);
a ClientApp that raises answers with an error message, as a SuperNode would.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE = 1000  # node ids of the simulated clients: FIRST_NODE + client index


class LocalGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict], run_config: dict, run_id: int = 1):
        self._run = Run.create_empty(run_id)
        self.client_app = client_app
        # one persistent Context per node: context.state survives rounds, as on a SuperNode
        self.nodes = {FIRST_NODE + i: Context(run_id=run_id, node_id=FIRST_NODE + i, node_config=dict(nc),
                                              state=RecordDict(), run_config=dict(run_config))
                      for i, nc in enumerate(node_configs)}
        self.down: set[int] = set()
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # strategies share one RecordDict across their messages
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            dst = msg.metadata.dst_node_id
            if dst in self.down:
                continue  # never answers: the strategy's timeout and minimum-clients rules decide
            try:
                reply = self.client_app(msg, self.nodes[dst])
            except (Exception, SystemExit) as e:  # noqa: BLE001 — a failing client is an error reply, not a dead server
                why = str(e.code) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
                reply = Message(Error(code=0, reason=why.removeprefix("error: ")), reply_to=msg)
            reply = copy.deepcopy(reply)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def set_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message() reads these


def run_in_process(server_app, grid: LocalGrid, run_config: dict) -> None:
    """SERVER_APP's main over GRID, in this thread."""
    set_identity()
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
