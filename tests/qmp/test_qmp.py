#!/usr/bin/env python3
"""Management-socket tests with QEMU's own client library (qemu.qmp) and raw sockets.

Usage: test_qmp.py VHOST_THIN_BINARY
Prints one line per check and a closing 'N passed, M failed' line; exits 1 on any failure.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient

BIN = os.path.abspath(sys.argv[1])
PASSED, FAILED = [], []
# Random data imported into disk0 before the daemon starts, so that a sent stream carries data.
IMPORT_BYTES = 3 << 20


def check(name, cond, detail=""):
    (PASSED if cond else FAILED).append(name)
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f"  -- {detail}"), flush=True)


def cli(*args):
    out = subprocess.run([BIN, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"vhost-thin {args}: {out.stderr}")
    return out.stdout


class Daemon:
    def __init__(self, d):
        self.d = d
        self.m, self.data = os.path.join(d, "pool.meta"), os.path.join(d, "pool.data")
        self.qmp = os.path.join(d, "qmp.sock")
        self.proc = None

    def start(self):
        for p in (self.qmp,):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(
            [BIN, "serve", "-m", self.m, "-d", self.data, "--qmp", self.qmp,
             "--socket-dir", self.d, "--disk", f"name=disk0,socket={self.d}/disk0.sock"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.d, "daemon.log"), "a"))
        for _ in range(400):
            if os.path.exists(self.qmp):
                return
            time.sleep(0.025)
        raise RuntimeError("no management socket")


def raw_client(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(10)
    f = s.makefile("rwb", buffering=0)
    return s, f


def read_msg(f):
    line = f.readline()
    return json.loads(line)


def read_reply(f):
    while True:
        m = read_msg(f)
        if "event" not in m:
            return m


def send(f, text):
    view = memoryview(text.encode() if isinstance(text, str) else text)
    while view:  # an unbuffered socket file may write only part
        n = f.write(view)
        view = view[n:]


async def qemu_qmp_session(dm, transcript):
    qmp = QMPClient("vhost-thin-test")
    events = []
    await qmp.connect(dm.qmp)
    check("qemu.qmp: greeting and negotiation", qmp.greeting is not None)
    v = await qmp.execute("query-version")
    transcript.append(("query-version", None, v))
    check("query-version has QEMU's shape", set(v["qemu"]) == {"major", "minor", "micro"} and "vhost-thin" in v["package"], v)
    cmds = {c["name"] for c in await qmp.execute("query-commands")}
    check("query-commands lists every command", {"disk-add", "snapshot-create", "query-pools"} <= cmds, cmds)

    listener = EventListener()

    async def collect():
        async for ev in listener:
            events.append(ev)

    qmp.register_listener(listener)
    task = asyncio.create_task(collect())

    pools = await qmp.execute("query-pools")
    transcript.append(("query-pools", None, pools))
    check("query-pools", pools[0]["name"] == "pool" and pools[0]["block-size"] == 65536 and pools[0]["mode"] == "write", pools)
    disks = await qmp.execute("query-disks")
    check("query-disks shows disk0", [d["name"] for d in disks] == ["disk0"] and disks[0]["size"] == 64 << 20, disks)

    r = await qmp.execute("disk-add", {"name": "disk1", "size": "32MiB", "num-queues": 2})
    transcript.append(("disk-add", {"name": "disk1", "size": "32MiB", "num-queues": 2}, r))
    check("disk-add creates and serves a disk", os.path.exists(r["socket"]) and r["thin-id"] == 1, r)
    r = await qmp.execute("snapshot-create", {"disk": "disk0", "name": "before-upgrade"})
    transcript.append(("snapshot-create", {"disk": "disk0", "name": "before-upgrade"}, r))
    check("snapshot-create reports the pause", "pause-us" in r, r)
    r = await qmp.execute("disk-add", {"name": "ci-1", "clone-from": "before-upgrade"})
    check("disk-add clone-from a snapshot", r["thin-id"] == 3, r)
    snaps = await qmp.execute("query-snapshots")
    check("query-snapshots", [s["name"] for s in snaps] == ["before-upgrade"] and snaps[0]["origin"] == "disk0", snaps)
    disks = {d["name"]: d for d in await qmp.execute("query-disks")}
    check("clone lineage", disks["ci-1"]["lineage"] == ["before-upgrade", "disk0"], disks["ci-1"])

    # query-delta pages: write nothing; the clone and its snapshot are the same: one run over
    # the imported data, all 'same'.
    d = await qmp.execute("query-delta", {"left": "before-upgrade", "right": "ci-1"})
    same = [{"begin": 0, "kind": "same", "length": IMPORT_BYTES // 65536}]
    check("query-delta of a fresh clone: nothing differs", d == {"block-size": 65536, "runs": same, "next": None}, d)
    await qmp.execute("disk-resize", {"name": "disk1", "size": 64 << 20})
    try:
        await qmp.execute("disk-resize", {"name": "disk1", "size": 1 << 20})
        check("disk-resize refuses to shrink", False)
    except ExecuteError as e:
        check("disk-resize refuses to shrink", e.error.error.class_ == "GenericError" and "only grow" in e.error.error.desc, e)
    await qmp.execute("disk-set-read-only", {"name": "ci-1", "read-only": True})
    disks = {d["name"]: d for d in await qmp.execute("query-disks")}
    check("disk-resize and disk-set-read-only", disks["disk1"]["size"] == 64 << 20 and disks["ci-1"]["read-only"], disks)

    await qmp.execute("pool-set-policy", {"out-of-space": "queue", "timeout": 5, "low-water-data": 90})
    p = (await qmp.execute("query-pools"))[0]
    check("pool-set-policy", p["policy"] == {"out-of-space": "queue", "timeout": 5} and p["low-water"]["data"] == 90, p)
    r = await qmp.execute("pool-reserve-metadata-snap")
    p = (await qmp.execute("query-pools"))[0]
    check("pool-reserve-metadata-snap", p["held-metadata-snap"] == r["block"], (r, p))
    try:
        await qmp.execute("pool-reserve-metadata-snap")
        check("a second metadata snapshot is refused", False)
    except ExecuteError as e:
        check("a second metadata snapshot is refused", "already held" in e.error.error.desc, e)
    await qmp.execute("pool-release-metadata-snap")
    await qmp.execute("pool-commit")
    r = await qmp.execute("pool-grow")
    check("pool-grow", r["data-blocks"] == 4096, r)

    r = await qmp.execute("snapshot-revert", {"disk": "disk1", "snapshot": "before-upgrade"})
    disk1 = {d["name"]: d for d in await qmp.execute("query-disks")}["disk1"]
    check("snapshot-revert of a disconnected disk", r == {} and disk1["size"] == 64 << 20, (r, disk1))
    for cmd, args, cls, text in [
        ("no-such-command", {}, "CommandNotFound", "has not been found"),
        ("disk-add", {"size": 1}, "GenericError", "Parameter 'name' is missing"),
        ("disk-add", {"name": "x", "size": 1 << 20, "bogus": 1}, "GenericError", "Parameter 'bogus' is unexpected"),
        ("disk-add", {"name": 5, "size": 1}, "GenericError", "Invalid parameter type for 'name'"),
        ("disk-add", {"name": "disk0", "size": 1 << 20}, "GenericError", "already in use"),
        ("disk-remove", {"name": "nope"}, "DeviceNotFound", "no disk or snapshot named 'nope'"),
        ("snapshot-delete", {"name": "disk0"}, "GenericError", "use disk-remove"),
        ("pool-set-policy", {"out-of-space": "maybe"}, "GenericError", "must be 'error' or 'queue'"),
    ]:
        try:
            await qmp.execute(cmd, args)
            check(f"error: {cmd} {args}", False, "succeeded")
        except ExecuteError as e:
            check(f"error: {cmd} {args}", e.error.error.class_ == cls and text in e.error.error.desc, f"{e.error.error.class_}: {e.error.error.desc}")
            transcript.append((cmd, args, {"error": {"class": e.error.error.class_, "desc": e.error.error.desc}}))

    # Connect to a disk socket as a frontend would: DISK_CONNECTED, then DISK_DISCONNECTED.
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(dm.d, "disk1.sock"))

    async def seen(*wanted):
        # Events arrive asynchronously: wait for them (up to 10 s) rather than sleep.
        for _ in range(200):
            if set(wanted) <= {e["event"] for e in events}:
                return
            await asyncio.sleep(0.05)

    await seen("DISK_CONNECTED")
    s.close()
    changes = {"DISK_ADDED", "SNAPSHOT_CREATED", "DISK_RESIZED", "DISK_READ_ONLY_CHANGED", "POOL_GROWN", "DISK_REVERTED", "DISK_CONNECTED", "DISK_DISCONNECTED"}
    await seen(*changes)
    names = [e["event"] for e in events]
    check("events for every change: " + ", ".join(sorted(changes)), changes <= set(names), names)
    check("events carry timestamps", all("seconds" in e["timestamp"] for e in events), events[:1])
    await qmp.execute("disk-remove", {"name": "ci-1"})
    await qmp.execute("snapshot-delete", {"name": "before-upgrade"})
    disks = [d["name"] for d in await qmp.execute("query-disks")]
    check("disk-remove and snapshot-delete", disks == ["disk0", "disk1"], disks)
    task.cancel()
    await qmp.disconnect()


async def jobs_session(dm, transcript):
    """snapshot-send and snapshot-receive as jobs, followed through qemu.qmp's event listener."""
    qmp = QMPClient("vhost-thin-jobs")
    await qmp.connect(dm.qmp)
    listener = EventListener(("JOB_STATUS_CHANGE", "JOB_PROGRESS"))
    qmp.register_listener(listener)
    events = []

    async def collect():
        async for ev in listener:
            events.append(ev)

    task = asyncio.create_task(collect())

    def statuses(job):
        return [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]

    async def until_status(job, status):
        # Jobs run in the background: wait for the event (up to 30 s) rather than sleep.
        for _ in range(600):
            if status in statuses(job):
                return
            await asyncio.sleep(0.05)

    async def job_info(job):
        return next((j for j in await qmp.execute("query-jobs") if j["id"] == job), None)

    stream = os.path.join(dm.d, "send-src.stream")
    await qmp.execute("snapshot-create", {"disk": "disk0", "name": "send-src"})
    args = {"job-id": "send-1", "snapshot": "send-src", "file": stream}
    r = await qmp.execute("snapshot-send", args)
    transcript.append(("snapshot-send", args, r))
    check("snapshot-send to a file starts a job", r == {"job-id": "send-1"}, r)
    await until_status("send-1", "concluded")
    st = statuses("send-1")
    check("JOB_STATUS_CHANGE through qemu.qmp: created, running, concluded", st == ["created", "running", "concluded"], st)
    concluded = next(e["data"] for e in events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "concluded")
    check("the concluded event carries the result", "result" in concluded and "error" not in concluded, concluded)
    j = await job_info("send-1")
    transcript.append(("query-jobs", None, [j]))
    sent = (j or {}).get("result", {}).get("sent", {})
    check("query-jobs: concluded, progress complete, the send's result",
          j is not None and j["status"] == "concluded" and j["type"] == "send" and "error" not in j
          and j["current-progress"] == j["total-progress"] > 0
          and sent.get("stream-bytes") == os.path.getsize(stream) and sent.get("data-bytes") == IMPORT_BYTES, j)
    for cmd, args, cls, text in [
        ("job-cancel", {"id": "send-1"}, "GenericError", "Job 'send-1' in state 'concluded' cannot accept command verb 'cancel'"),
        ("job-cancel", {"id": "nope"}, "DeviceNotFound", "Job 'nope' not found"),
        ("job-dismiss", {"id": "nope"}, "DeviceNotFound", "Job 'nope' not found"),
    ]:
        try:
            await qmp.execute(cmd, args)
            check(f"error: {cmd} {args}", False, "succeeded")
        except ExecuteError as e:
            check(f"error: {cmd} {args}", e.error.error.class_ == cls and e.error.error.desc == text, f"{e.error.error.class_}: {e.error.error.desc}")
            transcript.append((cmd, args, {"error": {"class": e.error.error.class_, "desc": e.error.error.desc}}))
    r = await qmp.execute("job-dismiss", {"id": "send-1"})
    await until_status("send-1", "null")
    check("job-dismiss forgets the job (status null event)", r == {} and await job_info("send-1") is None and statuses("send-1")[-1:] == ["null"], (r, statuses("send-1")))

    # The same snapshot (by its guid) is in the pool already: under its own name the receive
    # fails as a job and leaves nothing behind; under another name it is a second copy.
    args = {"job-id": "recv-dup", "file": stream}
    try:
        r = await qmp.execute("snapshot-receive", args)
        err = None
    except ExecuteError as e:
        r, err = None, e.error.error.desc
    snaps = [s["name"] for s in await qmp.execute("query-snapshots")]
    check("snapshot-receive of a snapshot the pool has, under its name, is refused, nothing left",
          r is None and "'send-src' is already in use" in (err or "") and await job_info("recv-dup") is None
          and snaps.count("send-src") == 1, (r, err, snaps))
    args = {"job-id": "recv-copy", "file": stream, "name": "send-copy"}
    await qmp.execute("snapshot-receive", args)
    await until_status("recv-copy", "concluded")
    j = await job_info("recv-copy")
    snaps = {s["name"]: s for s in await qmp.execute("query-snapshots")}
    check("snapshot-receive under another name keeps a second copy, same guid",
          j is not None and "error" not in j and "send-copy" in snaps
          and snaps["send-copy"].get("guid") == snaps["send-src"].get("guid"), (j, list(snaps)))
    await qmp.execute("job-dismiss", {"id": "recv-copy"})
    await qmp.execute("snapshot-delete", {"name": "send-copy"})
    # Once the original is deleted, the stream brings it back (checked offline against the
    # imported data at the end).
    await qmp.execute("snapshot-delete", {"name": "send-src"})
    r = await qmp.execute("snapshot-receive", {"file": stream})
    job = r.get("job-id")
    await until_status(job, "concluded")
    j = await job_info(job)
    res = (j or {}).get("result", {})
    snaps = {s["name"]: s for s in await qmp.execute("query-snapshots")}
    check("snapshot-receive of the file: concluded with the stream's name and size",
          j is not None and "error" not in j and res.get("name") == "send-src" and res.get("stream-bytes") == os.path.getsize(stream)
          and j["current-progress"] == j["total-progress"] == 64 << 20
          and snaps.get("send-src", {}).get("size") == 64 << 20 and statuses(job)[:1] == ["created"], (j, snaps))
    await qmp.execute("job-dismiss", {"id": job})
    check("query-jobs empty after the dismissals", await qmp.execute("query-jobs") == [])
    r = await qmp.execute("query-replication")
    transcript.append(("query-replication", None, r))
    check("query-replication returns a list", r == [], r)
    task.cancel()
    await qmp.disconnect()


def raw_tests(dm):
    s, f = raw_client(dm.qmp)
    g = read_msg(f)
    check("raw: greeting", "QMP" in g and "version" in g["QMP"] and g["QMP"]["capabilities"] == [], g)
    send(f, '{"execute": "query-pools", "id": 1}\n')
    r = read_msg(f)
    check("raw: commands before negotiation are refused", r == {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}, r)
    send(f, '{"execute": "qmp_capabilities"}')
    check("raw: negotiation", read_msg(f) == {"return": {}})
    send(f, '{"execute": "qmp_capabilities"}')
    r = read_msg(f)
    check("raw: second negotiation", r["error"]["class"] == "CommandNotFound", r)
    send(f, '{"execute": "query-version", "id": {"a": [1, "x"]}}')
    r = read_msg(f)
    check("raw: object id echoed verbatim", r["id"] == {"a": [1, "x"]}, r)
    send(f, '{"execute": "query-ve')
    time.sleep(0.05)
    send(f, 'rsion", "id": 2}{"execute": "query-version", "id": 3}')
    a, b = read_msg(f), read_msg(f)
    check("raw: split and joined messages", a["id"] == 2 and b["id"] == 3, (a, b))
    send(f, '{"execute": }\n')
    r = read_msg(f)
    check("raw: malformed JSON gets GenericError without id", r["error"]["class"] == "GenericError" and "id" not in r and "JSON parse error" in r["error"]["desc"], r)
    send(f, '[1, 2]\n')
    r = read_msg(f)
    check("raw: non-object input", r["error"]["desc"] == "QMP input must be a JSON object", r)
    send(f, '{"exec": "query-version", "id": 4}\n')
    r = read_msg(f)
    check("raw: unknown member", r == {"error": {"class": "GenericError", "desc": "QMP input member 'exec' is unexpected"}, "id": 4}, r)
    send(f, '{"execute": "query-version", "arguments": [1]}\n')
    r = read_msg(f)
    check("raw: arguments must be an object", "must be an object" in r["error"]["desc"], r)
    send(f, b'{"execute": "' + b"x" * (2 << 20) + b'"}\n')
    r = read_msg(f)
    check("raw: oversized message refused", r["error"]["desc"] == "JSON token size limit exceeded", r)
    send(f, '{"execute": "query-version", "id": 5}\n')
    check("raw: connection survives bad input", read_msg(f)["id"] == 5)

    # A client that negotiates and never reads must not hold anybody up.
    lazy, lf = raw_client(dm.qmp)
    read_msg(lf)
    send(lf, '{"execute": "qmp_capabilities"}\n')
    others = [raw_client(dm.qmp) for _ in range(8)]
    for _, of in others:
        read_msg(of)
        send(of, '{"execute": "qmp_capabilities"}\n')
        read_msg(of)
    t0 = time.time()
    for i in range(3000):  # each resize is an event to every client
        send(f, '{"execute": "disk-resize", "arguments": {"name": "disk1", "size": %d}}\n' % ((64 << 20) + (i + 1) * 512))
        r = read_reply(f)
        assert r == {"return": {"guest-notified": False}}, r
    dt = time.time() - t0
    send(others[3][1], '{"execute": "query-version", "id": "still-there"}\n')
    got = None
    for _ in range(5000):
        m = read_msg(others[3][1])
        if m.get("id") == "still-there":
            got = m
            break
    check(f"raw: 9 clients, one never reading; 3000 commands in {dt:.2f}s, others still served", got is not None, dt)
    for c, _ in others:
        c.close()
    lazy.close()
    s.close()


def main():
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        dm = Daemon(d)
        cli("pool", "create", "-m", dm.m, "-d", dm.data, "--data-size", "256MiB")
        cli("thin", "create", "-m", dm.m, "-d", dm.data, "--id", "0", "--size", "64MiB", "--name", "disk0")
        payload = os.path.join(d, "payload")
        with open(payload, "wb") as f:
            f.write(os.urandom(IMPORT_BYTES))
        cli("thin", "import", "-m", dm.m, "-d", dm.data, "--id", "0", "-i", payload)
        dm.start()
        transcript = []
        try:
            asyncio.run(qemu_qmp_session(dm, transcript))
            asyncio.run(jobs_session(dm, transcript))
            raw_tests(dm)
            # Durable when the command returned: kill -9, then the offline view has it all.
            asyncio.run(add_and_kill(dm))
            out = json.loads(cli("thin", "ls", "-m", dm.m, "-d", dm.data, "--json"))
            names = sorted(r["name"] for r in out)
            check("state changes survive kill -9", names == ["disk0", "disk1", "durable", "durable-snap", "send-src"], names)
            # The snapshot received back from its stream holds the data disk0 had.
            rid = next(r["id"] for r in out if r["name"] == "send-src")
            got = subprocess.run([BIN, "thin", "export", "-m", dm.m, "-d", dm.data, "--id", str(rid), "-o", "-"], capture_output=True).stdout
            want = open(payload, "rb").read()
            check("the received snapshot reads back the imported data, zeros after",
                  len(got) == 64 << 20 and got[:IMPORT_BYTES] == want and got[IMPORT_BYTES:].count(0) == len(got) - IMPORT_BYTES, len(got))
            check("pool check clean after kill -9", "clean" in cli("pool", "check", "-m", dm.m))
            dm.start()
            dm.proc.send_signal(signal.SIGTERM)
            check("SIGTERM exits 0", dm.proc.wait(timeout=30) == 0)
        finally:
            if dm.proc and dm.proc.poll() is None:
                dm.proc.kill()
        print("\nqemu.qmp session transcript:")
        for cmd, args, ret in transcript:
            print(f"  -> {json.dumps({'execute': cmd, **({'arguments': args} if args else {})})}")
            print(f"  <- {json.dumps(ret if isinstance(ret, dict) and 'error' in ret else {'return': ret})[:300]}")
    print(f"\n{len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


async def add_and_kill(dm):
    qmp = QMPClient("durability")
    await qmp.connect(dm.qmp)
    await qmp.execute("disk-add", {"name": "durable", "size": "8MiB"})
    await qmp.execute("snapshot-create", {"disk": "durable", "name": "durable-snap"})
    dm.proc.kill()
    dm.proc.wait()
    try:
        await qmp.disconnect()
    except Exception:
        pass


if __name__ == "__main__":
    main()
