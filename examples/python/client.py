#!/usr/bin/env python3
"""A handoff client written from schemas/README.md alone, with nats-py and nkeys.

It checks the README's signing test vector, creates a job, moves it (a dry run first),
sends the move again with the same id (answered `duplicate: true`) and reads the job's
history. Every step prints one JSON line; the last one sums up. Exits 1 on any refusal.

    python3 client.py --server nats://127.0.0.1:4222 --creds alice.creds
"""

import argparse
import asyncio
import json
import os
import sys
import time

import nats
import nkeys

# The README's test vector ("Signing a command").
VECTOR_SEED = "SUAAAAICAMCAKBQHBAEQUCYMBUHA6EARCIJRIFIWC4MBSGQ3DQOR4H776Y"
VECTOR_SUBJECT = "handoff.cmd.move-job"
VECTOR_BODY = (
    '{"id":"01JDQ2Y7Q8M5VZ3K6W8T4N2R9X","actor":"alice","at":1795702850339,'
    '"client":"test-vector","command":{"job":"sales/orders",'
    '"to":"backup2.example.net:/data/backup/","reason":"disk replaced","dry_run":false}}'
)
VECTOR_SIGNATURE = (
    "2c70c8b7c845788c814c6aaa4b9bcc440e32f21ca23d79b965191ea813aaf33d"
    "0f223fced6c6431433076e91b1f87bec0061800c8909a8c3bebc30423b14200a"
)

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class Refused(Exception):
    pass


def say(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def new_id():
    """A ULID: 48 bits of milliseconds, 80 random bits, 26 Crockford base-32 digits."""
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(CROCKFORD[(n >> (5 * (25 - i))) & 31] for i in range(26))


def sign(key, subject, body):
    """ed25519 over `handoff-command-v1`, LF, the subject, LF, the body as sent; hex."""
    signed = b"handoff-command-v1\n" + subject.encode() + b"\n" + body
    return key.sign(signed).hex()


class Handoff:
    def __init__(self, nc, user, key):
        self.nc, self.user, self.key = nc, user, key
        self.last_at = 0

    def now_ms(self):
        # Each request dated later than the one before: a retry signed in the same
        # millisecond would be the same bytes, and so a replay.
        self.last_at = max(int(time.time() * 1000), self.last_at + 1)
        return self.last_at

    async def command(self, endpoint, command, command_id=None):
        """Sends a signed command; its `ok` answer, or Refused with the error."""
        subject = f"handoff.cmd.{endpoint}"
        body = json.dumps(
            {
                "id": command_id or new_id(),
                "actor": self.user,
                "at": self.now_ms(),
                "client": "examples/python/client.py",
                "command": command,
            }
        ).encode()
        headers = {"Handoff-Signature": sign(self.key, subject, body)}
        msg = await self.nc.request(subject, body, timeout=10, headers=headers)
        reply = json.loads(msg.data)
        if "error" in reply:
            raise Refused(f"{endpoint}: {reply['error']}")
        return reply["ok"]

    async def query(self, name, request):
        msg = await self.nc.request(f"handoff.query.{name}", json.dumps(request).encode(), timeout=10)
        reply = json.loads(msg.data)
        if "error" in reply:
            raise Refused(f"{name}: {reply['error']}")
        return reply["ok"]

    async def pages(self, name, request):
        """Every item of a list query, page by page."""
        cursor = None
        while True:
            page = await self.query(name, {**request, "cursor": cursor})
            for item in page["items"]:
                yield item
            cursor = page.get("next")
            if cursor is None:
                return

    async def caught_up(self, seq, within=10.0):
        """Waits until the views include stream sequence `seq`."""
        deadline = time.monotonic() + within
        while (await self.query("status", {}))["checkpoint"] < seq:
            if time.monotonic() > deadline:
                raise Refused(f"the views did not reach sequence {seq} within {within} s")
            await asyncio.sleep(0.05)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="nats://127.0.0.1:4222")
    parser.add_argument("--creds", required=True, help="a handoff credentials file")
    parser.add_argument("--project", default="pyexample")
    args = parser.parse_args()

    vector = sign(nkeys.from_seed(bytearray(VECTOR_SEED.encode())), VECTOR_SUBJECT, VECTOR_BODY.encode())
    if vector != VECTOR_SIGNATURE:
        raise Refused(f"the signing test vector gives {vector}, not the README's")
    say("test_vector", ok=True)

    with open(args.creds) as f:
        creds = json.load(f)
    options = {}
    if creds.get("nats_seed"):
        options["nkeys_seed_str"] = creds["nats_seed"]
    nc = await nats.connect(args.server, connect_timeout=5, max_reconnect_attempts=3, **options)
    api = Handoff(nc, creds["user"], nkeys.from_seed(bytearray(creds["seed"].encode())))
    try:
        await api.command("configure-project", {"project": args.project})
        created = await api.command(
            "create-backup-jobs",
            {
                "project": args.project,
                "deployment": {"kind": "replica_set", "name": "rs0", "head_size_bytes": 1 << 20},
            },
        )
        job = f"{args.project}/rs0"
        say("created", job=job, events=[e["type"] for e in created["events"]])
        await api.caught_up(created["events"][-1]["seq"])
        owner = (await api.query("job", {"job": job}))["owner"]

        # A dry run on each other daemon that is up, until one passes every check.
        move = None
        async for d in api.pages("daemons", {"status": "up"}):
            if d["daemon"] == owner:
                continue
            request = {"job": job, "to": d["daemon"], "reason": "python example", "dry_run": True}
            try:
                plan = (await api.command("move-job", request))["plan"]
            except Refused as e:
                say("dry_run_refused", to=d["daemon"], error=str(e))
                continue
            say("dry_run", to=d["daemon"], checks=[c["name"] for c in plan["checks"]],
                free_before=plan["destination_free_before"], free_after=plan["destination_free_after"])
            move = {**request, "dry_run": False}
            break
        if move is None:
            raise Refused(f"no daemon can take {job}")

        move_id = new_id()
        applied = await api.command("move-job", move, move_id)
        say("moved", move_id=move_id, to=move["to"], duplicate=applied["duplicate"],
            events=[e["type"] for e in applied["events"]])
        # The same id again, signed anew: nothing changes.
        again = await api.command("move-job", move, move_id)
        say("retried", move_id=move_id, duplicate=again["duplicate"])

        await api.caught_up(applied["events"][-1]["seq"])
        history = [e async for e in api.pages("history", {"job": job})]
        for e in history:
            say("history", seq=e["seq"], type=e["type"], actor=e["actor"],
                reason=(e.get("data") or {}).get("reason"))
        say("done", job=job, move_id=move_id, to=move["to"], duplicate=again["duplicate"],
            history=[e["type"] for e in history])
    finally:
        await nc.close()


async def within(seconds):
    try:
        await asyncio.wait_for(main(), seconds)
    except asyncio.TimeoutError:
        raise Refused(f"not done within {seconds} s")


if __name__ == "__main__":
    try:
        asyncio.run(within(120))
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(1)
