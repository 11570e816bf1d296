#!/usr/bin/python3
# nbdkit-snapshot crash soak: random operations against nbdkit with the
# snapshot filter, kill -9 at random moments, restart on the same store
# and check the guarantees against a model.
#
#   soak.py [--seed N] [--rounds R | --minutes M] [--mode row|cbw|both]
#           [--self-test] [--keep] [--power-loss]
#
# The model holds the expected contents of the live volume and of every
# snapshot, and for every checkpoint the live contents when it was taken.
# Writes not yet covered by a flush (or FUA, or a checkpoint, which
# flushes) are uncertain: for each 4 KiB page the model keeps the earlier
# contents it had since the last flush, and after a crash each byte of
# the page may read as any of them or as the newest.  After every
# restart:
#   1. every page of the live volume reads as allowed (flushed and FUA
#      writes survived), and the model then takes what was read;
#   2. every snap/NAME reads exactly as the model's copy;
#   3. every block of the live volume that differs from a checkpoint's
#      copy is marked in dirty/NAME (block status type 0); extra marks
#      are counted and reported;
#   4. a job interrupted by the kill is running again (resumed), the views
#      read as above while it runs, it ends "done", and they still do;
#      the store's checkpoints are the model's.
# Kills come between operations, with writes in flight on several
# connections, just after a control request is sent, and during a
# running delete or revert job (-D snapshot.job_delay slows jobs).
#
# With --power-loss the origin and the store are on tests/powerfs, a
# FUSE file system that keeps apart what was synced: after each kill
# the power goes too (powerfs drops every unsynced page and directory
# change, or keeps each with a chance of 20, 50 or 80%, in whole 4 KiB
# pages), and nbdkit restarts as in another boot (the boot id the store
# recorded is replaced by another one).
# The model needs nothing more: it already allows an unflushed write to
# read old or new, and takes nothing else as certain.  Extra marks are
# counted as before; "newly marked" are those an export did not have at
# its previous check.
#
# The sequence of operations, kill kinds and kill points comes from the
# seed; where exactly the server is when SIGKILL lands depends on timing,
# so a replay runs the same operations but may find the server at a
# slightly different point.

import argparse
import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import nbd

PAGE = 4096
MIB = 1 << 20


class CheckFailed(Exception):
    pass


def log(msg):
    print(msg, flush=True)


class Server:
    """One nbdkit with the snapshot filter over the file plugin."""

    def __init__(self, top, workdir, mode, block_size, job_delay,
                 datadir=None):
        self.filter = os.path.join(
            top, "filters/snapshot/.libs/nbdkit-snapshot-filter.so")
        self.workdir = workdir
        datadir = datadir or workdir
        self.origin = os.path.join(datadir, "origin.img")
        self.store = os.path.join(datadir, "store")
        self.sock = os.path.join(workdir, "nbd.sock")
        self.pidfile = os.path.join(workdir, "nbdkit.pid")
        self.logfile = os.path.join(workdir, "nbdkit.log")
        self.control_sock = os.path.join(self.store, "control.sock")
        self.mode = mode
        self.block_size = block_size
        self.job_delay = job_delay
        self.proc = None
        self.starts = 0
        self.trace = None

    def start(self):
        for f in (self.pidfile, self.sock):
            if os.path.exists(f):
                os.unlink(f)
        cmd = ["nbdkit", "-f", "-U", self.sock, "-P", self.pidfile,
               "--filter=" + self.filter, "file", self.origin,
               "snapshot-store=" + self.store,
               "snapshot-mode=" + self.mode,
               "snapshot-block-size=%d" % self.block_size,
               "-D", "snapshot.job_delay=%d" % self.job_delay,
               "-D", "snapshot.intent_clear_ms=0"]
        with open(self.logfile, "a") as lf:
            lf.write("----- start %d: %s\n" % (self.starts, " ".join(cmd)))
            lf.flush()
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=lf,
                                         stdin=subprocess.DEVNULL)
        self.starts += 1
        # Ready when the pid file is written (the store is open and the
        # control socket listens) and the NBD socket takes a connection.
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise CheckFailed("nbdkit exited during start-up (status %d)"
                                  % self.proc.returncode)
            if os.path.exists(self.pidfile) and \
               os.path.getsize(self.pidfile) > 0:
                try:
                    h = self.connect()
                    h.shutdown()
                    return
                except nbd.Error:
                    pass
            if time.monotonic() > deadline:
                raise CheckFailed("nbdkit not ready after 60 s")
            time.sleep(0.005)

    def kill(self):
        if self.trace:
            self.trace("SIGKILL")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def busy_threads(self):
        """nbdkit's threads other than its main thread and the filter's
        own ("snap-..."): those of connections not fully closed."""
        n = 0
        taskdir = "/proc/%d/task" % self.proc.pid
        for tid in os.listdir(taskdir):
            if int(tid) == self.proc.pid:
                continue
            try:
                with open(os.path.join(taskdir, tid, "comm")) as f:
                    if not f.read().startswith("snap-"):
                        n += 1
            except OSError:
                pass                    # gone meanwhile
        return n

    def stop(self):
        # nbdkit closes a connection's socket before it closes the
        # filter's and the plugin's handles, and once SIGTERM has come
        # it closes no handle (nbdkit 1.32 calls no plugin or filter
        # while quitting): under memory checking they would show as
        # leaks.  Let the threads of the clients that went finish first.
        deadline = time.monotonic() + 10
        while self.busy_threads() > 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed("nbdkit did not stop within 60 s of SIGTERM")
        if rc != 0:
            raise CheckFailed("nbdkit exited with %d after SIGTERM" % rc)

    def connect(self, export="", meta=False):
        h = nbd.NBD()
        h.set_export_name(export)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(self.sock)
        return h

    def control_send(self, req):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.control_sock)
        s.sendall((json.dumps(req) + "\n").encode())
        return s

    def control(self, req, timeout=120):
        if self.trace:
            self.trace("control %s" % json.dumps(req))
        s = self.control_send(req)
        s.settimeout(timeout)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise CheckFailed("control socket closed before the reply "
                                  "to %s" % json.dumps(req))
            buf += chunk
        s.close()
        return json.loads(buf)


class PowerFS:
    """tests/powerfs: a FUSE file system that keeps what was synced, and
    loses the rest at a crash (see powerfs.c)."""

    def __init__(self, prog, mnt):
        self.mnt = mnt
        os.mkdir(mnt)
        self.proc = subprocess.Popen([prog, mnt], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        line = self.proc.stdout.readline()
        if line != "ready\n":
            raise CheckFailed("powerfs did not mount %s: %r" % (mnt, line))

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise CheckFailed("powerfs exited")
        return reply.split()

    def crash(self, percent, seed):
        """Power off and on: what was synced stays, and each unsynced
        page or directory with probability PERCENT.  Returns the pages
        kept and dropped."""
        r = self.command("crash %d %d" % (percent, seed))
        if r[0] != "crashed":
            raise CheckFailed("powerfs crash: %s" % " ".join(r))
        return int(r[2]), int(r[4])

    def close(self):
        """Unmount (lazily) and wait for the file system to go."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


class Model:
    def __init__(self, origin_bytes, block_size):
        self.size = len(origin_bytes)
        self.bs = block_size
        self.live = bytearray(origin_bytes)
        # page -> earlier contents still allowed after a crash
        self.cands = {}
        # checkpoints, oldest first: name -> {"kind", "content"}
        self.order = []
        self.ckpts = {}
        # the running job, as the model knows it
        self.job = None

    def page(self, p):
        return bytes(self.live[p * PAGE:(p + 1) * PAGE])

    def write(self, off, data, fua=False):
        n = len(data)
        first, last = off // PAGE, (off + n - 1) // PAGE
        prev = {p: self.page(p) for p in range(first, last + 1)}
        self.live[off:off + n] = data
        for p in range(first, last + 1):
            new = self.page(p)
            old = self.cands.get(p, [])
            if fua:
                s = max(off, p * PAGE) - p * PAGE
                e = min(off + n, (p + 1) * PAGE) - p * PAGE
                merged = []
                for c in old:
                    c = c[:s] + new[s:e] + c[e:]
                    if c != new and c not in merged:
                        merged.append(c)
                old = merged
            elif prev[p] != new and prev[p] not in old:
                old = old + [prev[p]]
            if old:
                self.cands[p] = old
            else:
                self.cands.pop(p, None)

    def flush(self):
        self.cands = {}

    def snapshots(self):
        return [n for n in self.order if self.ckpts[n]["kind"] == "snapshot"]


def byte_diff(got, allowed):
    for i in range(len(got)):
        if all(a[i] != got[i] for a in allowed):
            return i
    return None


class Soak:
    def __init__(self, args, mode, seed, workdir):
        self.args = args
        self.mode = mode
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.stats = {"kills": 0, "kill_idle": 0, "kill_io": 0,
                      "kill_control": 0, "kill_job": 0, "stops": 0,
                      "ops": 0, "checks": 0, "jobs_resumed": 0,
                      "extra_marked": 0, "max_extra": 0,
                      "control_applied": 0, "power_losses": 0,
                      "pages_kept": 0, "pages_dropped": 0,
                      "extra_new": 0}
        self.prev_marked = {}
        rng = self.rng
        self.size = rng.choice([4, 8]) * MIB
        self.bs = rng.choice([4096, 16384, 65536])
        job_delay = rng.choice([5000, 20000, 40000])
        # The origin: random data, allocated zeros and holes.
        origin = bytearray(rng.randbytes(self.size))
        chunk = 256 * 1024
        kinds = [rng.randrange(3) for _ in range(0, self.size, chunk)]
        for i, k in enumerate(kinds):
            if k:
                origin[i * chunk:(i + 1) * chunk] = bytes(chunk)
        self.power = None
        if args.power_loss:
            # The origin and the store on powerfs.
            self.power = PowerFS(os.path.join(args.top, "tests/powerfs/powerfs"),
                                 os.path.join(workdir, "mnt"))
            self.server = Server(args.top, workdir, mode, self.bs, job_delay,
                                 self.power.mnt)
        else:
            self.server = Server(args.top, workdir, mode, self.bs, job_delay)
        with open(self.server.origin, "wb") as f:
            f.truncate(self.size)
            for i, k in enumerate(kinds):
                if k != 2:
                    f.seek(i * chunk)
                    f.write(origin[i * chunk:(i + 1) * chunk])
            f.flush()
            os.fsync(f.fileno())
        if self.power:
            fd = os.open(self.power.mnt, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
        self.model = Model(bytes(origin), self.bs)
        self.names = 0
        self.round = 0
        self.tracef = open(os.path.join(workdir, "trace.log"), "w",
                           buffering=1)
        self.server.trace = self.trace
        self.where = "start"
        log("%s: seed %d, volume %d MiB, block size %d, job delay %d us, "
            "%sdir %s" % (mode, seed, self.size // MIB, self.bs, job_delay,
                          "power loss, " if self.power else "", workdir))

    def new_boot(self):
        """The next start is in another boot: the boot the store records
        (boot-id, written by the filter) is not the kernel's.  (A mount
        namespace with a file bound over the kernel's boot id would do
        it without touching the store, but would hold copies of every
        mount of the machine, other tests' too, while nbdkit runs.)"""
        path = os.path.join(self.server.store, "boot-id")
        if not os.path.exists(path):
            return      # none recorded: taken as another boot
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"%s\n" % str(uuid.UUID(
            bytes=self.rng.randbytes(16))).encode())
        os.fsync(fd)
        os.close(fd)

    # Each power loss keeps every unsynced page and directory change
    # with one of these chances (in percent): none, some, most.
    KEEP = [0, 0, 20, 50, 80]

    def power_loss(self):
        """After nbdkit is killed: the power goes, and comes back in
        another boot."""
        percent = self.rng.choice(self.KEEP)
        kept, dropped = self.power.crash(percent, self.rng.randrange(1 << 62))
        self.trace("power loss: unsynced pages kept %d (%d%%), dropped %d"
                   % (kept, percent, dropped))
        self.stats["power_losses"] += 1
        self.stats["pages_kept"] += kept
        self.stats["pages_dropped"] += dropped
        self.new_boot()

    def trace(self, msg):
        self.tracef.write("%d: %s\n" % (self.round, msg))

    # ---------- connections ----------

    def open_handles(self):
        self.handles = [self.server.connect() for _ in range(3)]
        self.multi_conn = self.handles[0].can_multi_conn()

    def drop_handles(self):
        for h in getattr(self, "handles", []):
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self.handles = []

    def lose_handles(self):
        # After a kill: the connections are dead.
        self.handles = []

    def h(self):
        return self.handles[self.rng.randrange(len(self.handles))]

    # ---------- operations ----------

    def rand_range(self):
        rng = self.rng
        size, bs = self.size, self.bs
        kind = rng.randrange(4)
        if kind == 0:      # page aligned
            n = rng.randrange(1, 17) * PAGE
            off = rng.randrange(0, (size - n) // PAGE + 1) * PAGE
        elif kind == 1:    # unaligned
            n = rng.randrange(1, 3 * bs)
            off = rng.randrange(0, size - n + 1)
        elif kind == 2:    # across a block edge
            edge = rng.randrange(1, size // bs) * bs
            a = rng.randrange(1, min(2 * PAGE, edge + 1))
            b = rng.randrange(1, 2 * PAGE)
            off, n = edge - a, min(a + b, size - (edge - a))
        else:              # whole blocks
            n = rng.randrange(1, 4) * bs
            off = rng.randrange(0, (size - n) // bs + 1) * bs
        return off, n

    def op_write(self, fua=False):
        off, n = self.rand_range()
        data = self.rng.randbytes(n)
        h = self.h()
        self.trace("write %d+%d%s" % (off, n, " fua" if fua else ""))
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
        self.model.write(off, data, fua)

    def op_zero(self):
        off, n = self.rand_range()
        fua = self.rng.randrange(3) == 0
        flags = (nbd.CMD_FLAG_FUA if fua else 0) | \
            (nbd.CMD_FLAG_NO_HOLE if self.rng.randrange(2) else 0)
        self.trace("zero %d+%d flags %d" % (off, n, flags))
        self.h().zero(n, off, flags)
        self.model.write(off, bytes(n), fua)

    def op_trim(self):
        off, n = self.rand_range()
        h = self.h()
        old = bytes(self.model.live[off:off + n])
        self.trace("trim %d+%d" % (off, n))
        h.trim(n, off)
        new = h.pread(n, off)
        bad = [i for i in range(n) if new[i] != old[i] and new[i] != 0]
        if bad:
            raise CheckFailed("trim(%d, %d): byte at %d is neither old nor "
                              "zero" % (n, off, off + bad[0]))
        self.model.write(off, new, False)

    def op_flush(self):
        self.trace("flush")
        if self.multi_conn:
            self.h().flush()
        else:
            for h in self.handles:
                h.flush()
        self.model.flush()

    def op_read(self):
        off, n = self.rand_range()
        got = self.h().pread(n, off)
        if got != bytes(self.model.live[off:off + n]):
            i = next(i for i in range(n)
                     if got[i] != self.model.live[off + i])
            raise CheckFailed("live read at %d: got %#x, expected %#x "
                              "(no crash since)" % (off + i, got[i],
                                                    self.model.live[off + i]))

    def batch(self):
        """Page-disjoint writes for several connections at once."""
        rng = self.rng
        npages = self.size // PAGE
        used = set()
        writes = []
        for _ in range(rng.randrange(2, 12)):
            n = rng.randrange(1, 9) * PAGE
            if rng.randrange(2):
                n -= rng.randrange(0, PAGE)
            off = rng.randrange(0, self.size - n + 1)
            pages = set(range(off // PAGE, (off + n - 1) // PAGE + 1))
            if pages & used:
                continue
            used |= pages
            fua = rng.randrange(4) == 0
            writes.append((off, rng.randbytes(n), fua,
                           rng.randrange(len(self.handles))))
        assert npages > 0
        return writes

    def submit(self, writes):
        self.trace("batch %s" % [(off, len(d), fua, hi)
                                 for off, d, fua, hi in writes])
        cookies = []
        for off, data, fua, hi in writes:
            h = self.handles[hi]
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            c = h.aio_pwrite(buf, off, None,
                             nbd.CMD_FLAG_FUA if fua else 0)
            cookies.append((h, c, buf))
        return cookies

    def complete(self, h, c):
        while not h.aio_command_completed(c):
            h.poll(-1)

    def op_batch(self):
        writes = self.batch()
        cookies = self.submit(writes)
        for h, c, _ in cookies:
            self.complete(h, c)
        for off, data, fua, _ in writes:
            self.model.write(off, data, fua)

    def new_name(self, prefix):
        self.names += 1
        return "%s%d" % (prefix, self.names)

    def op_create(self, bitmap):
        if len(self.model.order) >= 6:
            return self.op_delete()
        name = self.new_name("b" if bitmap else "s")
        req = {"cmd": "create", "name": name}
        if bitmap:
            req["bitmap_only"] = True
        r = self.server.control(req)
        if not r.get("ok"):
            if self.model.job and self.model.job["kind"] == "revert" \
               and not bitmap:
                return  # no snapshot during a revert
            raise CheckFailed("create %s: %s" % (name, r.get("error")))
        self.model_create(name, bitmap)

    def model_create(self, name, bitmap):
        m = self.model
        m.order.append(name)
        m.ckpts[name] = {"kind": "bitmap" if bitmap else "snapshot",
                         "content": bytes(m.live)}
        # Taking a checkpoint flushes the live volume.
        m.flush()

    def wait_job(self):
        job = self.model.job
        if job is None:
            return
        self.where = "waiting for job %s" % job
        while True:
            r = self.server.control({"cmd": "wait", "job": job["id"],
                                     "timeout_ms": 60000})
            if not r.get("ok"):
                raise CheckFailed("wait for job %d: %s" % (job["id"],
                                                           r.get("error")))
            st = r["job"]["state"]
            if st != "running":
                break
        if st != "done":
            raise CheckFailed("job %s ended %s: %s" %
                              (job, st, r["job"].get("error")))
        self.model.job = None

    def delete_req(self, pick, strat_pick, keep):
        """The control request of a delete; the model's choice of name
        from draws made in any case, so the RNG stays in step."""
        m = self.model
        if not m.order:
            return None
        name = m.order[pick % len(m.order)]
        req = {"cmd": "delete", "name": name}
        if m.ckpts[name]["kind"] == "snapshot":
            if self.mode == "row":
                req["strategy"] = ["auto", "commit", "stream"][strat_pick]
            if keep:
                req["keep_bitmap"] = True
        return req

    def model_delete(self, req, job_id):
        m = self.model
        name = req["name"]
        if m.ckpts[name]["kind"] == "snapshot":
            if req.get("keep_bitmap"):
                m.ckpts[name]["kind"] = "bitmap"
            else:
                m.order.remove(name)
                del m.ckpts[name]
            m.job = {"id": job_id, "kind": "delete", "name": name}
        else:
            m.order.remove(name)
            del m.ckpts[name]

    def op_delete(self):
        rng = self.rng
        pick, strat, keep = rng.randrange(1000), rng.randrange(3), \
            rng.randrange(3) == 0
        self.wait_job()
        req = self.delete_req(pick, strat, keep)
        if req is None:
            return
        r = self.server.control(req)
        if not r.get("ok"):
            raise CheckFailed("delete %s: %s" % (req, r.get("error")))
        self.model_delete(req, r["job"]["id"] if "job" in r else None)

    def revert_req(self, pick):
        snaps = self.model.snapshots()
        if not snaps:
            return None
        return {"cmd": "revert", "name": snaps[pick % len(snaps)]}

    def model_revert(self, name, job_id):
        m = self.model
        m.live = bytearray(m.ckpts[name]["content"])
        m.cands = {}
        m.job = {"id": job_id, "kind": "revert", "name": name}

    def op_revert(self):
        pick = self.rng.randrange(1000)
        self.wait_job()
        req = self.revert_req(pick)
        if req is None:
            return
        r = self.server.control(req)
        if not r.get("ok"):
            raise CheckFailed("revert %s: %s" % (req["name"], r.get("error")))
        self.model_revert(req["name"], r["job"]["id"])

    def op_wait(self):
        self.wait_job()

    OPS = [("write", 30), ("fua", 8), ("zero", 8), ("trim", 4),
           ("flush", 8), ("read", 5), ("batch", 8), ("snap", 5),
           ("bitmap", 4), ("delete", 7), ("revert", 2), ("wait", 2)]

    def do_op(self):
        names, weights = zip(*self.OPS)
        op = self.rng.choices(names, weights)[0]
        self.where = "op %s" % op
        self.stats["ops"] += 1
        if op == "write":
            self.op_write()
        elif op == "fua":
            self.op_write(fua=True)
        elif op == "zero":
            self.op_zero()
        elif op == "trim":
            self.op_trim()
        elif op == "flush":
            self.op_flush()
        elif op == "read":
            self.op_read()
        elif op == "batch":
            self.op_batch()
        elif op == "snap":
            self.op_create(False)
        elif op == "bitmap":
            self.op_create(True)
        elif op == "delete":
            self.op_delete()
        elif op == "revert":
            self.op_revert()
        elif op == "wait":
            self.op_wait()

    # ---------- kills ----------

    def kill_idle(self):
        self.server.kill()
        return None

    def kill_io(self):
        writes = self.batch()
        k = self.rng.randrange(len(writes) + 1)
        cookies = self.submit(writes)
        # In flight: each page may have been written or not.
        for off, data, fua, _ in writes:
            self.model.write(off, data, False)
        if self.rng.randrange(2):
            # and a flush in flight (it makes nothing certain)
            self.h().aio_flush()
        for h, c, _ in cookies[:k]:
            self.complete(h, c)
        self.server.kill()
        return None

    def kill_control(self):
        rng = self.rng
        kind = rng.randrange(4)
        pick, strat, keep = rng.randrange(1000), rng.randrange(3), \
            rng.randrange(3) == 0
        delay = rng.randrange(0, 3000) / 1e6
        pending = None
        if kind <= 1:
            name = self.new_name("b" if kind else "s")
            req = {"cmd": "create", "name": name}
            if kind:
                req["bitmap_only"] = True
            pending = ("create", req, bytes(self.model.live))
        elif self.model.job is None and kind == 2:
            req = self.delete_req(pick, strat, keep)
            if req:
                pending = ("delete", req, None)
        elif self.model.job is None:
            req = self.revert_req(pick)
            if req:
                pending = ("revert", req, None)
        if pending is None:
            req = {"cmd": "list"}
        s = self.server.control_send(req)
        time.sleep(delay)
        self.server.kill()
        s.close()
        return pending

    def kill_job(self):
        rng = self.rng
        pick, strat, keep = rng.randrange(1000), rng.randrange(3), \
            rng.randrange(3) == 0
        pct = rng.randrange(0, 100)
        revert = rng.randrange(4) == 0
        io = rng.randrange(2) == 0
        if self.model.job is None:
            req = self.revert_req(pick) if revert else None
            if req is None:
                req = self.delete_req(pick, strat, keep)
            while req and req["cmd"] == "delete" and \
                    self.model.ckpts[req["name"]]["kind"] != "snapshot":
                pick += 1
                req = self.delete_req(pick, strat, keep)
                if all(self.model.ckpts[n]["kind"] != "snapshot"
                       for n in self.model.order):
                    req = None
            if req is not None:
                r = self.server.control(req)
                if not r.get("ok"):
                    raise CheckFailed("%s: %s" % (req, r.get("error")))
                if req["cmd"] == "revert":
                    self.model_revert(req["name"], r["job"]["id"])
                else:
                    self.model_delete(req, r["job"]["id"])
        if io:
            # Client writes while the job runs.
            self.op_batch()
        job = self.model.job
        if job is not None:
            while True:
                r = self.server.control({"cmd": "jobs"})
                j = [j for j in r["jobs"] if j["id"] == job["id"]][0]
                if j["state"] != "running" or \
                   j["bytes_done"] >= j["bytes_total"] * pct // 100:
                    break
                time.sleep(0.002)
        self.server.kill()
        return None

    def kill_stop(self):
        # nbdkit waits for its clients to go before it exits.
        self.drop_handles()
        self.server.stop()
        return None

    # ---------- checks ----------

    def read_export(self, export):
        h = self.server.connect(export)
        out = bytearray()
        for off in range(0, self.size, MIB):
            out += h.pread(min(MIB, self.size - off), off)
        h.shutdown()
        return bytes(out)

    def dirty_marked(self, name):
        h = self.server.connect("dirty/" + name, meta=True)
        marked = set()
        pos = 0
        bs = self.bs

        def cb(ctx, off, entries, err):
            nonlocal pos
            if ctx != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            o = off
            for i in range(0, len(entries), 2):
                ln, fl = entries[i], entries[i + 1]
                if fl == 0:
                    marked.update(range(o // bs, (o + ln + bs - 1) // bs))
                elif fl != 3:
                    raise CheckFailed("dirty/%s: block status type %d at %d"
                                      % (name, fl, o))
                o += ln
            pos = o
            return 0
        while pos < self.size:
            h.block_status(self.size - pos, pos, cb)
        h.shutdown()
        return marked

    def check_dirty(self, name, base, new):
        """dirty/NAME marks every block where NEW differs from BASE, reads
        as NEW in the marked blocks and as zeros elsewhere."""
        bs = self.bs
        marked = self.dirty_marked(name)
        changed = {b for b in range(self.size // bs)
                   if new[b * bs:(b + 1) * bs] != base[b * bs:(b + 1) * bs]}
        missing = changed - marked
        if missing:
            raise CheckFailed("dirty/%s: %d changed blocks not marked, "
                              "first %s" % (name, len(missing),
                                            sorted(missing)[:8]))
        extra = len(marked - changed)
        self.stats["extra_marked"] += extra
        self.stats["max_extra"] = max(self.stats["max_extra"], extra)
        # Extra marks this export did not have at its last check: what
        # the last crash (or the writes since) added.
        fresh = (marked - changed) - self.prev_marked.get(name, set())
        self.stats["extra_new"] += len(fresh)
        self.prev_marked[name] = marked
        got = self.read_export("dirty/" + name)
        zero = bytes(bs)
        for b in range(self.size // bs):
            want = new[b * bs:(b + 1) * bs] if b in marked else zero
            if got[b * bs:(b + 1) * bs] != want:
                raise CheckFailed("dirty/%s: block %d (%s) does not read as "
                                  "%s" % (name, b, "marked" if b in marked
                                          else "not marked",
                                          "the view" if b in marked
                                          else "zeros"))

    def check_list(self, running_name):
        m = self.model
        r = self.server.control({"cmd": "list"})
        got = [(c["name"], c["kind"]) for c in r["checkpoints"]]
        want = [(n, m.ckpts[n]["kind"]) for n in m.order]
        if running_name is not None:
            got = [g for g in got if g[0] != running_name]
            want = [w for w in want if w[0] != running_name]
        if got != want:
            raise CheckFailed("checkpoints in the store %s, model %s"
                              % (got, want))

    def check_live(self, live):
        m = self.model
        for p in range(self.size // PAGE):
            got = live[p * PAGE:(p + 1) * PAGE]
            want = m.page(p)
            if got == want:
                continue
            cands = m.cands.get(p, [])
            if got in cands:
                continue
            i = byte_diff(got, [want] + cands)
            if i is not None:
                raise CheckFailed(
                    "live volume at %d (page %d, %d earlier contents "
                    "allowed): read %#x, allowed %s" %
                    (p * PAGE + i, p, len(cands), got[i],
                     sorted({a[i] for a in [want] + cands})))

    def check_views(self, running_name):
        """Guarantees 1-3 and the store's checkpoints; returns the live
        contents read."""
        m = self.model
        self.stats["checks"] += 1
        self.check_list(running_name)
        live = self.read_export("")
        self.check_live(live)
        for name in m.snapshots():
            got = self.read_export("snap/" + name)
            want = m.ckpts[name]["content"]
            if got != want:
                i = next(i for i in range(self.size) if got[i] != want[i])
                raise CheckFailed("snap/%s at %d: read %#x, taken as %#x"
                                  % (name, i, got[i], want[i]))
        for name in m.order:
            if name == running_name:
                continue    # cannot be opened while its job runs
            self.check_dirty(name, m.ckpts[name]["content"], live)
        # dirty/FROM/TO: from the oldest checkpoint to each newer snapshot
        # (the first checkpoint whose job does not run).
        froms = [n for n in m.order if n != running_name]
        for to in m.snapshots():
            if froms and to != froms[0] and to != running_name:
                self.check_dirty(froms[0] + "/" + to,
                                 m.ckpts[froms[0]]["content"],
                                 m.ckpts[to]["content"])
        return live

    def recover(self, pending):
        """After a kill: restart, settle what the kill left undecided,
        check everything, let a resumed job finish, check again, and
        take what the live volume read as the model's."""
        m = self.model
        self.where = "restart"
        self.server.start()
        if pending is not None:
            kind, req, before = pending
            r = self.server.control({"cmd": "list"})
            present = {c["name"]: c["kind"] for c in r["checkpoints"]}
            jobs = self.server.control({"cmd": "jobs"})["jobs"]
            running = [j for j in jobs if j["state"] == "running"]
            name = req["name"]
            applied = False
            if kind == "create":
                applied = name in present
                if applied:
                    self.model_create(name, bool(req.get("bitmap_only")))
            elif kind == "delete":
                k = m.ckpts[name]["kind"]
                if k == "bitmap":
                    applied = name not in present
                else:
                    applied = (name not in present or
                               present[name] == "bitmap" or
                               any(j["name"] == name for j in running))
                if applied:
                    self.model_delete(req, None)
            elif kind == "revert":
                if any(j["kind"] == "revert" for j in running):
                    applied = True
                else:
                    applied = self.read_export("") == \
                        m.ckpts[name]["content"]
                if applied:
                    self.model_revert(name, None)
            self.trace("after the kill: %s %s applied: %s" %
                       (kind, name, applied))
            if applied:
                self.stats["control_applied"] += 1
        jobs = self.server.control({"cmd": "jobs"})["jobs"]
        running = [j for j in jobs if j["state"] == "running"]
        if m.job is not None and not running:
            # It ended before the kill.
            m.job = None
        if running:
            j = running[0]
            if m.job is None:
                raise CheckFailed("a job runs after the restart that the "
                                  "model does not know: %s" % j)
            if not j["resumed"] or j["name"] != m.job["name"] or \
               j["kind"] != m.job["kind"]:
                raise CheckFailed("job after restart %s, model %s"
                                  % (j, m.job))
            self.stats["jobs_resumed"] += 1
            self.trace("resumed job %s" % j)
            m.job["id"] = j["id"]
            self.where = "check while the resumed job runs"
            self.check_views(m.job["name"])
            self.wait_job()
        self.where = "check after restart"
        live = self.check_views(None)
        m.live = bytearray(live)
        m.cands = {}

    # ---------- rounds ----------

    KILLS = [("idle", 3), ("io", 3), ("control", 2), ("job", 3),
             ("stop", 1)]

    def run_round(self):
        rng = self.rng
        self.round += 1
        if self.round % 200 == 0:
            # Keep the trace of the last 200 to 400 rounds only.
            path = self.tracef.name
            self.tracef.close()
            os.replace(path, path + ".old")
            self.tracef = open(path, "w", buffering=1)
        self.open_handles()
        for _ in range(rng.randrange(1, 12)):
            self.do_op()
        names, weights = zip(*self.KILLS)
        kind = rng.choices(names, weights)[0]
        self.where = "kill %s" % kind
        self.trace("kill %s" % kind)
        pending = getattr(self, "kill_" + kind)()
        if kind == "stop":
            self.stats["stops"] += 1
        else:
            self.stats["kills"] += 1
            self.stats["kill_" + kind] += 1
            self.lose_handles()
            if self.power:
                self.power_loss()
        self.recover(pending)

    def self_test(self):
        """Each check must be able to fail: corrupt a copy of the model
        in one way at a time and expect the checker to say so."""
        self.open_handles()
        self.op_write()
        self.op_create(False)
        self.op_create(True)
        for _ in range(20):
            self.op_write()
        self.op_flush()
        self.drop_handles()
        self.wait_job()
        self.check_views(None)
        good = self.model
        marked = self.dirty_marked(good.order[-1])
        bs = self.bs
        unmarked = [b for b in range(self.size // bs) if b not in marked]
        snap = good.snapshots()[-1]
        page = next(p for p in range(self.size // PAGE)
                    if p not in good.cands)

        def corrupt_live(m):
            m.live[page * PAGE + 7] ^= 0xff

        def corrupt_snap(m):
            c = bytearray(m.ckpts[snap]["content"])
            c[12345] ^= 0x01
            m.ckpts[snap]["content"] = bytes(c)

        def corrupt_dirty(m):
            name = m.order[-1]
            c = bytearray(m.ckpts[name]["content"])
            c[unmarked[0] * bs] ^= 0x80
            m.ckpts[name]["content"] = bytes(c)

        def corrupt_list(m):
            m.order.append("ghost")
            m.ckpts["ghost"] = {"kind": "bitmap", "content": bytes(m.live)}

        def corrupt_uncertain(m):
            # A write the model thinks unflushed-but-allowed, with the old
            # contents not among the allowed ones.
            # (the page was flushed, so the model's page is what is read)
            real = m.page(page)
            m.live[page * PAGE:(page + 1) * PAGE] = bytes(b ^ 0x55
                                                          for b in real)
            m.cands[page] = [bytes(b ^ 0x33 for b in real)]

        for what, f in [("live", corrupt_live), ("snapshot", corrupt_snap),
                        ("dirty", corrupt_dirty), ("list", corrupt_list),
                        ("uncertain", corrupt_uncertain)]:
            if what == "dirty" and not unmarked:
                raise CheckFailed("self-test: every block is marked")
            self.model = copy.deepcopy(good)
            f(self.model)
            try:
                self.check_views(None)
            except CheckFailed as e:
                log("self-test: corrupted %s model detected: %s" % (what, e))
            else:
                raise CheckFailed("self-test: the checker missed a "
                                  "corrupted %s model" % what)
        self.model = good
        self.check_views(None)
        # And a job the model expects to run but the store never heard of.
        self.model.job = {"id": 999999, "kind": "delete", "name": snap}
        try:
            self.wait_job()
        except CheckFailed as e:
            log("self-test: wrong job detected: %s" % e)
        else:
            raise CheckFailed("self-test: the checker missed a wrong job")
        self.model.job = None


def run_mode(args, mode, seed, rounds, deadline):
    workdir = tempfile.mkdtemp(prefix="soak-%s." % mode, dir=args.tmpdir)
    soak = Soak(args, mode, seed, workdir)
    ok = False
    try:
        soak.server.start()
        if args.self_test:
            soak.self_test()
        while True:
            if rounds is not None and soak.round >= rounds:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            soak.run_round()
            if soak.round % 500 == 0:
                log("%s: round %d, %d kills so far" %
                    (mode, soak.round, soak.stats["kills"]))
        soak.wait_job()
        soak.drop_handles()
        soak.server.stop()
        ok = True
    except (CheckFailed, nbd.Error, OSError, AssertionError) as e:
        log("FAIL: %s: seed %d round %d (%s): %s: %s" %
            (mode, seed, soak.round, soak.where, type(e).__name__, e))
        log("replay: %s --mode %s --seed %d --rounds %d%s" %
            (sys.argv[0], mode, seed, soak.round,
             " --power-loss" if args.power_loss else ""))
        log("kept: %s (nbdkit log: %s)" % (workdir, soak.server.logfile))
        try:
            with open(soak.server.logfile) as f:
                tail = f.readlines()[-30:]
            log("last lines of the nbdkit log:\n" + "".join(tail))
        except OSError:
            pass
        if soak.server.proc and soak.server.proc.poll() is None:
            soak.server.kill()
    s = soak.stats
    log("%s: seed %d: %d rounds, %d kills (idle %d, io %d, control %d, "
        "job %d), %d clean stops, %d ops, %d checks, %d jobs resumed, "
        "%d control requests applied before the kill, extra marked "
        "blocks %d in all (at most %d in one dirty/ export), %d of them "
        "newly marked since the export's last check" %
        (mode, seed, soak.round, s["kills"], s["kill_idle"], s["kill_io"],
         s["kill_control"], s["kill_job"], s["stops"], s["ops"],
         s["checks"], s["jobs_resumed"], s["control_applied"],
         s["extra_marked"], s["max_extra"], s["extra_new"]))
    if soak.power:
        log("%s: seed %d: %d power losses (every kill), unsynced pages "
            "kept %d, dropped %d" %
            (mode, seed, s["power_losses"], s["pages_kept"],
             s["pages_dropped"]))
    if soak.power:
        if not ok:
            # Keep what the file system holds now (after the crash, if
            # the failure came after one).
            try:
                shutil.copytree(soak.power.mnt,
                                os.path.join(workdir, "powerfs-copy"),
                                ignore=shutil.ignore_patterns("*.sock"))
                log("kept: a copy of the powerfs mount in %s/powerfs-copy"
                    % workdir)
            except OSError as e:
                log("could not copy the powerfs mount: %s" % e)
        soak.power.close()
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return ok, s


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="crash soak of the snapshot "
                                "filter")
    p.add_argument("--seed", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--mode", choices=["row", "cbw", "both"], default="both")
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--power-loss", action="store_true",
                   help="origin and store on tests/powerfs; each kill is "
                   "also a power loss")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--top", default=os.environ.get(
        "abs_top_builddir", os.path.dirname(os.path.dirname(here))))
    p.add_argument("--tmpdir", default=os.environ.get("TMPDIR", "/tmp"))
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    if args.rounds is None and args.minutes is None:
        args.rounds = 20
    modes = ["row", "cbw"] if args.mode == "both" else [args.mode]
    log("soak: seed %d, modes %s%s, %s" %
        (args.seed, ",".join(modes),
         " with power loss" if args.power_loss else "",
         "%d rounds each" % args.rounds if args.rounds is not None
         else "%g minutes" % args.minutes))
    total = 0
    ok = True
    start = time.monotonic()
    for i, mode in enumerate(modes):
        deadline = None
        if args.minutes is not None:
            share = args.minutes * 60 / len(modes)
            deadline = start + share * (i + 1)
        good, s = run_mode(args, mode, args.seed, args.rounds, deadline)
        total += s["kills"]
        if not good:
            ok = False
            break
    log("soak: seed %d: %s, %d kills" % (args.seed,
                                        "passed" if ok else "FAILED", total))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
