"""What each client frame does: the use-cases behind the gateway's read loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from protocol import (
    Ack,
    Auth,
    Cancel,
    ClientFrame,
    ErrorCode,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Left,
    MessageEvent,
    Ping,
    Pong,
    Role,
    Send,
    Typing,
    TypingNotice,
)
from storage.jobs.base import ReplyJob
from storage.records import AppendResult, MessageDraft
from storage.window.base import AppendFollow, AppendRefused

from .. import keys
from ..errors import DEPENDENCY_ERRORS, ServiceError
from ..fanout.events import Event
from ..fanout.publish import publish
from ..fanout.session import Session
from ..limits.base import Refusal, TierLimits

_USER = Role.USER.value  # an enum's .value is a property: not per message

log = logging.getLogger("chatserver.commands")

_WELCOME_WAIT_S = 2.0  # a join waits this long at most for its presence frame
_WELCOME_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *DEPENDENCY_ERRORS)

Reply = Callable[[Any], None]  # queue a direct reply frame to the client


async def dispatch(
    app: web.Application, session: Session, frame: ClientFrame, reply: Reply
) -> None:
    """Carry out one valid client frame; errors are raised as ServiceError."""
    if isinstance(frame, Send):
        await _on_send(app, session, frame, reply)
    elif isinstance(frame, Join):
        await _on_join(app, session, frame, reply)
    elif isinstance(frame, Ping):
        reply(Pong(frame.ts, frame.ref))
    elif isinstance(frame, Typing):
        # Coalesced before the membership check: a flood costs neither a look-up nor fan-out.
        if not app[keys.TYPING].allow(session.user_id, frame.conversation_id):
            return
        await app[keys.CONVERSATIONS].require_member(frame.conversation_id, session.user_id)
        notice = TypingNotice(frame.conversation_id, session.user_id)
        await publish(app, frame.conversation_id, notice.to_dict())
    elif isinstance(frame, History):
        await _on_history(app, session, frame, reply)
    elif isinstance(frame, Leave):
        await app[keys.HUB].leave(session, frame.conversation_id)
        reply(Left(frame.conversation_id, frame.ref))
    elif isinstance(frame, Cancel):
        await _on_cancel(app, session, frame)
    elif isinstance(frame, Auth):
        raise ServiceError(ErrorCode.BAD_FRAME, "already authenticated")


async def _on_join(app: web.Application, session: Session, frame: Join, reply: Reply) -> None:
    conversations = app[keys.CONVERSATIONS]
    hub = app[keys.HUB]
    # Each joined conversation holds a subscription (with Redis, a channel) for the
    # connection: bounded. A re-join of a joined one is always allowed.
    max_joined = app[keys.SETTINGS].ws.max_joined
    if frame.conversation_id not in session.subscriptions and (
        len(session.subscriptions) >= max_joined
    ):
        raise ServiceError(
            ErrorCode.RATE_LIMITED, f"at most {max_joined} conversations joined per connection"
        )
    await conversations.require_member(frame.conversation_id, session.user_id)
    await hub.join(session, frame.conversation_id)
    try:
        view = await conversations.join_view(frame.conversation_id, frame.since)
        snapshot = await app[keys.GENERATION].join_snapshot(frame.conversation_id)
        if snapshot is not None and any(
            m.client_msg_id == snapshot.generation_id for m in view.messages
        ):
            snapshot = None  # stored already (its buffer is just being released)
    except BaseException:
        await hub.leave(session, frame.conversation_id)
        raise
    reply(
        Joined(
            frame.conversation_id,
            view.view.epoch,
            view.view.last_offset,
            view.recovered,
            view.messages,
            snapshot,
            frame.ref,
        )
    )
    log.info(
        "joined",
        extra={
            "session": session.id,
            "user": session.user_id,
            "conversation": frame.conversation_id,
        },
    )
    gen = (snapshot.generation_id, snapshot.seq) if snapshot is not None else None
    session.release(frame.conversation_id, view.view.last_offset, gen)
    # After `joined`: who is online, this member included. A slow or failing store does not
    # hold the connection's next frames: the list follows when it is read.
    try:
        async with asyncio.timeout(_WELCOME_WAIT_S):
            await app[keys.PRESENCE].welcome(session, frame.conversation_id)
    except _WELCOME_ERRORS as exc:
        log.warning("presence not sent with the join: %r", exc, extra={"session": session.id})


# A send refused by these is no question: the early call of a user sending them is wasted.
_REFUSALS = frozenset((ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED))


async def _on_send(app: web.Application, session: Session, frame: Send, reply: Reply) -> None:
    conversations = app[keys.CONVERSATIONS]
    generation = app[keys.GENERATION]
    conversation = await conversations.require_member(frame.conversation_id, session.user_id)
    if app[keys.AGENTS].get(conversation.agent_id) is None:
        # Refuse before the ack: an acked question must get its reply.
        raise ServiceError(
            ErrorCode.UNAVAILABLE, f"agent {conversation.agent_id!r} is not configured here"
        )
    generation.check_capacity(conversation.id)
    follow = generation.append_follow(conversation, frame.text)
    # Where the append can take the reply's slot, the model call starts now, beside it:
    # the reply's run adopts it (chatserver/generation/early.py).
    early = generation.begin_early(conversation, frame.text, session.user_id) if follow else None
    try:
        result = await _append_within_limits(
            app,
            session,
            MessageDraft(
                conversation_id=conversation.id,
                role=_USER,
                text=frame.text,
                user_id=session.user_id,
                client_msg_id=frame.client_msg_id,
            ),
            follow,
        )
    except BaseException as exc:
        if early is not None:
            if isinstance(exc, ServiceError) and exc.code in _REFUSALS:
                generation.early_wasted(early, session.user_id)
            else:
                early.cancel()
        raise
    message = result.message
    reply(
        Ack(
            frame.client_msg_id,
            message.id,
            message.offset,
            message.created_at,
            result.duplicate,
            frame.ref,
        )
    )
    if log.isEnabledFor(logging.DEBUG):  # its extra dict is per message: not built for nothing
        # Ids only: message text is never logged.
        log.debug(
            "message accepted",
            extra={
                "session": session.id,
                "user": session.user_id,
                "conversation": conversation.id,
                "message_id": message.id,
                "offset": message.offset,
                "duplicate": result.duplicate,
            },
        )
    if result.duplicate:
        if early is not None:  # a resend: the first send's reply is made (or was)
            generation.early_wasted(early, session.user_id)
        return
    metrics = app[keys.METRICS]
    metrics.child(metrics.messages_appended, _USER).inc()
    if app[keys.SETTINGS].replies.crash_after_append:
        os._exit(70)  # tests only: dies right after the append (with Redis, its fan-out)
    fanned = MessageEvent(message).to_dict()
    try:
        if result.fanned_out:  # the append published it to the other instances: ours only
            app[keys.BROKER].deliver_local((Event(conversation.id, fanned, time.time()),))
        else:
            await publish(app, conversation.id, fanned)
    except BaseException:
        if early is not None:
            early.cancel()
        raise
    job = None
    if result.job_id is not None:
        metrics.reply_jobs_queued.inc()
        job = ReplyJob(result.job_id, message, first=result.job_first)
    generation.start(conversation, message, job, result.followed, early=early)


async def _append_within_limits(
    app: web.Application,
    session: Session,
    draft: MessageDraft,
    follow: Callable[[str], AppendFollow | None] | None = None,
) -> AppendResult:
    """Quota and rate by tier, then the append: so before any model call.

    Where the limiter and the window can, the check is the append's gate: one round trip
    for both, and a resend of an accepted message is answered before the check (never
    refused). Else the limiter checks first, and a refused resend is looked up.
    """
    conversations = app[keys.CONVERSATIONS]
    limiter = app[keys.LIMITER]
    principal = session.principal
    limits = app[keys.SETTINGS].tier_limits(principal.tier)
    gate = limiter.send_gate(principal.user_id, limits) if conversations.window.gates else None
    if gate is None:
        refused = await limiter.check_send(principal.user_id, limits)
        # A resend of an accepted message (its ack was lost) costs nothing: it gets its
        # duplicate ack, not a refusal. Looked up only when refused: no round trip more per
        # send.
        if refused is not None and (
            draft.client_msg_id is None
            or not await conversations.was_sent(
                draft.conversation_id, principal.user_id, draft.client_msg_id
            )
        ):
            raise _limit_error(refused, limits)
        return await conversations.append(draft, follow=follow)
    for _ in range(2):
        try:
            return await conversations.append(draft, gate, follow=follow)
        except AppendRefused as exc:
            refused = await limiter.gate_refused(principal.user_id, exc.code, exc.value)
            if refused is not None:
                raise _limit_error(refused, limits) from None
    raise ServiceError(
        ErrorCode.UNAVAILABLE, "the send limits could not be checked", retry_after_ms=500
    )


def _limit_error(refused: Refusal, limits: TierLimits) -> ServiceError:
    wait_ms = refused.retry_after_ms
    if refused.code is ErrorCode.QUOTA_EXCEEDED:
        return ServiceError(
            ErrorCode.QUOTA_EXCEEDED,
            f"daily quota of {limits.daily_tokens} model tokens used up",
            retry_after_ms=wait_ms,
        )
    return ServiceError(
        ErrorCode.RATE_LIMITED,
        f"at most {limits.messages_per_minute} messages per minute",
        retry_after_ms=wait_ms,
    )


async def _on_history(app: web.Application, session: Session, frame: History, reply: Reply) -> None:
    conversations = app[keys.CONVERSATIONS]
    await conversations.require_member(frame.conversation_id, session.user_id)
    page = await conversations.history(
        frame.conversation_id, frame.before, frame.effective_limit(app[keys.LIMITS])
    )
    reply(HistoryPage(frame.conversation_id, page.messages, page.has_more, frame.ref))


async def _on_cancel(app: web.Application, session: Session, frame: Cancel) -> None:
    generation = app[keys.GENERATION]
    owner = await generation.locate(frame.generation_id)
    if owner is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "no running reply with that generation_id")
    await app[keys.CONVERSATIONS].require_member(owner.conversation_id, session.user_id)
    await generation.cancel(owner)
