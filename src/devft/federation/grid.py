"""Grids: an in-process Grid that calls the ClientApp directly, and a metering wrapper.

`InProcessGrid` runs the *same* ClientApp that Flower's runtimes run, without Ray's start-up
(8.4 s here; see flower_inprocess.md). A client that raises comes back as an error reply, as
in the real runtimes. `MeteredGrid` wraps any Grid and counts the serialized bytes of every
message sent down and every reply sent up.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from devft.federation.budgets import SHARED_PROCESS_KEY
from devft.federation.shipping import SHIPPED, record_bytes
from devft.federation.wire import wire_bytes

log = logging.getLogger(__name__)

CLIENT_EXCEPTION = 1  # error code of a reply whose ClientApp raised
CLIENT_TIMEOUT = 2  # error code of a reply that came after the round's timeout


class InProcessGrid(Grid):
    """Delivers each message to `client_app` in this process; one persistent Context per node."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict[str, object] | None = None,
        first_node_id: int = 1001,
    ) -> None:
        self._app = client_app
        self._run = None
        self._timeout: float | None = None
        self._inbox: dict[str, Message] = {}
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes,
                             SHARED_PROCESS_KEY: True},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_id in enumerate(range(first_node_id, first_node_id + num_nodes))
        }
        # Message() reads the process-wide task identity; the real runtimes set it per process.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    @property
    def run(self):  # type: ignore[override]
        return self._run

    def set_run(self, run) -> None:  # type: ignore[override]
        self._run = run

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            message_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id  # as Flower's link state does
            context = self.contexts[msg.metadata.dst_node_id]
            start = time.perf_counter()
            try:
                reply = self._app(msg, context)
                elapsed = time.perf_counter() - start
                if self._timeout is not None and elapsed > self._timeout:
                    # an in-process call cannot be pre-empted: its late reply is discarded
                    reason = f"timed out ({elapsed:.1f} s > {self._timeout} s)"
                    reply = Message(Error(code=CLIENT_TIMEOUT, reason=reason), reply_to=msg)
            except Exception as err:  # a failing client must not stop the run
                log.warning(
                    "client %s raised %s: %s",
                    context.node_config["partition-id"],
                    type(err).__name__,
                    err,
                )
                reply = Message(
                    Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                    reply_to=msg,
                )
            self._inbox[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._inbox.pop(i) for i in message_ids if i in self._inbox]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self._timeout = timeout
        try:
            return self.pull_messages(self.push_messages(messages))
        finally:
            self._timeout = None


@dataclass
class Counts:
    """Serialized bytes of training traffic, and of measurement-only (evaluate) traffic."""

    down: int = 0
    up: int = 0
    dense_down: int = 0
    """Of `down`: the dense layers shipped to clients without the base (model.ship_layers)."""
    failed: int = 0
    eval_down: int = 0
    eval_up: int = 0
    eval_seconds: float = 0.0


def _is_eval(message: Message) -> bool:
    return message.metadata.message_type.startswith(MessageType.EVALUATE)


class MeteredGrid(Grid):
    """Wraps a Grid; counts serialized bytes down (server -> clients) and up (replies).

    Evaluate messages (personalized evaluation) are measurement, counted apart, and their
    round trips timed so that wall time can exclude them.
    """

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.counts = Counts()

    @property
    def run(self):  # type: ignore[override]
        return self.inner.run

    def set_run(self, run) -> None:  # type: ignore[override]
        self.inner.set_run(run)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def _count_down(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for m in messages:
            if _is_eval(m):
                self.counts.eval_down += wire_bytes(m)
            else:
                self.counts.down += wire_bytes(m)
                if SHIPPED in m.content:
                    self.counts.dense_down += record_bytes(m.content, SHIPPED)
        return messages

    def _count_up(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if _is_eval(reply):
                self.counts.eval_up += wire_bytes(reply)
                continue
            if reply.has_error():
                self.counts.failed += 1
            self.counts.up += wire_bytes(reply)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._count_down(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count_up(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = self._count_down(messages)
        start = time.perf_counter()
        replies = self._count_up(self.inner.send_and_receive(messages, timeout=timeout))
        if messages and _is_eval(messages[0]):
            self.counts.eval_seconds += time.perf_counter() - start
        return replies

    def take_counts(self) -> Counts:
        """The counts since the last call; resets them."""
        counts, self.counts = self.counts, Counts()
        return counts
