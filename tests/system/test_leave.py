"""A member who leaves stops receiving and being let in, on every instance (real processes)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from chatclient.client import ChatApi, ChatError
from protocol import Left, MessageEvent

from .scaleout import connect, instances, token


async def test_leaving_on_one_instance_ends_the_members_subscriptions_everywhere(
    tmp_path: Path, redis_url: str
) -> None:
    with instances(tmp_path, redis_url, count=2) as (a, b):
        async with aiohttp.ClientSession() as http:
            alice_api = ChatApi(a.url, token("alice"), http)
            conv = str((await alice_api.create_conversation(members=["bob", "carol"]))["id"])
            alice = await connect(a, "alice")
            bob = await connect(b, "bob")
            carol = await connect(b, "carol")  # stays, on bob's instance
            try:
                await alice.join(conv)
                await bob.join(conv)
                await carol.join(conv)
                first = await alice.send(conv, "before")
                await bob.expect(MessageEvent, lambda m: m.message.id == first.message_id)

                bob_api = ChatApi(a.url, token("bob"), http)  # leaves through the other one
                status, _ = await bob_api.request("DELETE", f"/api/conversations/{conv}/members/me")
                assert status == 204
                left = await bob.expect(Left, timeout=5)
                assert left.conversation_id == conv

                after = await alice.send(conv, "after")
                # carol has it: bob's instance has handled it, and it did not reach bob
                await carol.expect(MessageEvent, lambda m: m.message.id == after.message_id)
                assert after.message_id not in [
                    f.message.id for f in bob.pending() if isinstance(f, MessageEvent)
                ]
                with pytest.raises(ChatError) as refused:  # nor does it let him in
                    await bob.join(conv)
                assert refused.value.code == "forbidden"
                _, listed = await bob_api.request("GET", "/api/conversations")
                assert listed["items"] == []
                status, body = await bob_api.request(
                    "DELETE", f"/api/conversations/{conv}/members/me"
                )
                assert (status, body["error"]["code"]) == (403, "forbidden")
                _, alices = await alice_api.request("GET", "/api/conversations")
                assert alices["items"][0]["members"] == ["alice", "carol"]
            finally:
                await alice.close()
                await bob.close()
                await carol.close()
