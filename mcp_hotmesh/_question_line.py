"""The gateway's part of a handler's questions to the agent's client, for one waiting call (SDK-free).

A ``q:<call id>`` NOTIFY (or the waiting call's slow timer, for a lost one) makes the call's ``QuestionLine`` read
the pending question (``caller_request``), check it as hostile input from the worker role
(``_questions.question_problem``), have the ``Asker`` put it to the agent's client (``_asking``, where the SDK is),
and post the answer (``caller_answer``). A question the gateway refuses, or that no client can answer, is answered
"unavailable" with the reason, so the handler never waits in vain. When the call's wait ends, a question still
open with the client is withdrawn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

import anyio
import anyio.abc

from ._common import JSON
from ._questions import question_problem, unavailable
from ._streams import CallerAPI
from .errors import HotMeshError, InvalidInput, PayloadTooLarge

log = logging.getLogger(__name__)

Asker = Callable[[str, dict[str, JSON], float], Awaitable[dict[str, JSON]]]
"""``ask(kind, request, seconds)``: the answer of the agent's client to a checked question, within ``seconds``;
never raises (a client that cannot answer gives an "unavailable" answer)."""

NO_CLIENT = ("This tool needs to ask the user (or the user's model) something, but the call did not come through "
             "a client connection that can be asked.")


class QuestionLine:
    """Serves the questions of one waiting call, one at a time."""

    def __init__(self, api: CallerAPI, call_id: UUID, asker: Asker | None, deadline: float) -> None:
        self.api = api
        self.call_id = call_id
        self.asker = asker
        self.deadline = deadline  # time.monotonic() when the call's wait ends
        self._busy = False
        self._again = False  # a question was announced while one was being served
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._served: set[int] = set()

    def look(self, tg: anyio.abc.TaskGroup) -> None:
        """Serve the pending question, if any (in a task of ``tg``)."""
        if self._closed:
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        tg.start_soon(self._serve)

    def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    async def _serve(self) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                while not self._closed:
                    self._again = False
                    await self._serve_one()
                    if not self._again:
                        break
        finally:
            self._busy = False
            self._scope = None

    async def _serve_one(self) -> None:
        try:
            question = await self.api.request(self.call_id)
        except HotMeshError as exc:
            log.warning("could not read the question of call %s: %s", self.call_id, exc)
            return
        if question is None or question.seq in self._served:
            return
        self._served.add(question.seq)
        problem = question_problem(question.kind, question.request)
        seconds = self.deadline - time.monotonic()
        if problem is not None:
            log.warning("call %s: a question from its worker was refused: %s", self.call_id, problem)
            answer = unavailable(f"The gateway refused to pass the question on: {problem}.")
        elif self.asker is None:
            answer = unavailable(NO_CLIENT)
        elif seconds <= 0:
            return
        else:
            assert isinstance(question.request, dict)
            try:
                answer = await self.asker(question.kind, question.request, seconds)
            except Exception:  # a bug must cost this question, never the engine's other calls
                log.exception("call %s: asking the client failed", self.call_id)
                answer = unavailable("The gateway failed to ask the client.")
        try:
            await self.api.answer(self.call_id, question.seq, answer)
        except (PayloadTooLarge, InvalidInput):
            await self._answer_quietly(question.seq, unavailable("The client's answer was too large to pass on."))
        except HotMeshError as exc:
            log.warning("could not answer the question of call %s: %s", self.call_id, exc)

    async def _answer_quietly(self, seq: int, answer: dict[str, JSON]) -> None:
        try:
            await self.api.answer(self.call_id, seq, answer)
        except HotMeshError as exc:
            log.warning("could not answer the question of call %s: %s", self.call_id, exc)
