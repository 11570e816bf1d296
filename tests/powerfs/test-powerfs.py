#!/usr/bin/python3
# nbdkit-snapshot tests: powerfs keeps exactly what was synced.
#
#   test-powerfs.py POWERFS TMPDIR
#
# Mounts powerfs on TMPDIR/mnt, writes files and directories, syncs
# some of it in each of the ways a program can (fsync, fdatasync, a
# directory's fsync, O_DSYNC, msync of a shared mapping), crashes, and
# checks that exactly the synced state is left; then that a crash that
# keeps every unsynced page (100%) keeps everything, and that a torn one
# keeps each page whole, old or new.

import mmap
import os
import signal
import socket
import subprocess
import sys

PAGE = 4096


class FS:
    def __init__(self, prog, mnt):
        self.mnt = mnt
        self.p = subprocess.Popen([prog, mnt], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True,
                                  bufsize=1)
        assert self.p.stdout.readline() == "ready\n"

    def cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def crash(self, percent=0, seed=1):
        r = self.cmd("crash %d %d" % (percent, seed))
        assert r.startswith("crashed"), r
        return dict(zip(r.split()[1::2], map(int, r.split()[2::2])))

    def close(self):
        self.p.stdin.close()
        assert self.p.wait() == 0

    def path(self, name):
        return os.path.join(self.mnt, name)


def write(path, data, off=0, flags=0, sync=None):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
    os.pwrite(fd, data, off)
    if sync == "fsync":
        os.fsync(fd)
    elif sync == "fdatasync":
        os.fdatasync(fd)
    os.close(fd)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def expect(what, got, want):
    if got != want:
        sys.exit("FAIL: %s: got %r, expected %r" % (what, got, want))
    print("ok: %s" % what)


def main():
    prog, tmp = sys.argv[1], sys.argv[2]
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    fs = FS(prog, mnt)
    a, b, c = (b"A" * 3 * PAGE, b"B" * PAGE, b"C" * 100)
    try:
        # A file and a directory whose entries are synced.
        os.mkdir(fs.path("d"))
        write(fs.path("d/f"), a, sync="fsync")
        write(fs.path("d/g"), a, sync="fdatasync")
        fsync_dir(fs.path("d"))
        fsync_dir(mnt)
        # Unsynced: a write, an extension, a new file whose data is
        # synced but not its entry, an unlink, a rename over a file.
        write(fs.path("d/f"), b, PAGE)
        write(fs.path("d/f"), c, 3 * PAGE)
        write(fs.path("d/new"), b, sync="fsync")
        os.unlink(fs.path("d/g"))
        write(fs.path("d/tmp"), c, sync="fsync")
        os.rename(fs.path("d/tmp"), fs.path("d/f2"))
        # Synced data in a file whose entry is synced (in another
        # directory, "e": syncing "d" would make the above durable).
        os.mkdir(fs.path("e"))
        fsync_dir(mnt)
        # O_DSYNC: durable at once (but its new entry is not).
        write(fs.path("dsync"), b, flags=os.O_DSYNC)
        write(fs.path("e/h"), a)
        fsync_dir(fs.path("e"))
        write(fs.path("e/h"), b, 0, flags=os.O_DSYNC)
        # A shared mapping: one stored into and msync'd, one stored into
        # only (the kernel holds the dirty page until the crash).
        write(fs.path("e/m1"), bytes(2 * PAGE), sync="fsync")
        write(fs.path("e/m2"), bytes(2 * PAGE), sync="fsync")
        fsync_dir(fs.path("e"))
        for name, sync in (("m1", True), ("m2", False)):
            fd = os.open(fs.path("e/" + name), os.O_RDWR)
            m = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED)
            m[PAGE:PAGE + 5] = b"hello"
            if sync:
                m.flush()
            m.close()
            os.close(fd)
        # A Unix socket can be bound on it (the control socket).
        s = socket.socket(socket.AF_UNIX)
        s.bind(fs.path("e/sock"))
        s.listen()
        t = socket.socket(socket.AF_UNIX)
        t.connect(fs.path("e/sock"))
        t.close()
        s.close()
        # Holes: a punched page reads as zeros and SEEK_DATA skips it.
        fd = os.open(fs.path("e/m1"), os.O_RDWR)
        expect("SEEK_DATA before a punch", os.lseek(fd, 0, os.SEEK_DATA), 0)
        os.close(fd)

        r = fs.crash(0)
        expect("crash counts something dropped", r["dropped"] > 0, True)
        expect("synced file, unsynced write and extension",
               read(fs.path("d/f")), a)
        expect("unlink not synced: the file is back",
               read(fs.path("d/g")), a)
        expect("new file with synced data, entry not synced: gone",
               os.path.exists(fs.path("d/new")), False)
        expect("rename not synced: gone", os.path.exists(fs.path("d/f2")),
               False)
        expect("temporary file of the rename: gone (never synced)",
               os.path.exists(fs.path("d/tmp")), False)
        expect("O_DSYNC file, entry not synced: gone",
               os.path.exists(fs.path("dsync")), False)
        expect("O_DSYNC write to a synced entry", read(fs.path("e/h")),
               b + b"A" * 2 * PAGE)
        expect("shared mapping, msync'd", read(fs.path("e/m1"))[PAGE:PAGE + 5],
               b"hello")
        expect("shared mapping, not synced",
               read(fs.path("e/m2"))[PAGE:PAGE + 5], bytes(5))
        expect("socket entry not synced: gone",
               os.path.exists(fs.path("e/sock")), False)
        expect("listings after the crash",
               [sorted(os.listdir(fs.path(x))) for x in ("d", "e")],
               [["f", "g"], ["h", "m1", "m2"]])

        # Punching a hole, then syncing.
        fd = os.open(fs.path("d/f"), os.O_RDWR)
        os.posix_fallocate(fd, 0, 4 * PAGE)
        os.close(fd)
        subprocess.run(["fallocate", "-p", "-o", str(PAGE), "-l", str(PAGE),
                        fs.path("d/f")], check=True)
        fd = os.open(fs.path("d/f"), os.O_RDONLY)
        expect("SEEK_DATA past a punched page",
               os.lseek(fd, PAGE, os.SEEK_DATA), 2 * PAGE)
        expect("SEEK_HOLE", os.lseek(fd, 0, os.SEEK_HOLE), PAGE)
        os.fsync(fd)
        os.close(fd)
        fs.crash(0)
        expect("punched and synced", read(fs.path("d/f")),
               b"A" * PAGE + bytes(PAGE) + b"A" * PAGE + bytes(PAGE))

        # A crash that keeps every unsynced page and directory: all of it.
        write(fs.path("d/f"), b, 0)
        write(fs.path("d/k"), c)
        os.unlink(fs.path("d/g"))
        fs.crash(100)
        expect("crash keeping everything: data", read(fs.path("d/f"))[:PAGE], b)
        expect("crash keeping everything: entries",
               sorted(os.listdir(fs.path("d"))), ["f", "k"])

        # A shared mapping stored into by a process killed with SIGKILL
        # before any msync: its dirty page is in the kernel at the
        # crash, which writes it back to powerfs first; a crash that
        # keeps unsynced pages keeps it, one that drops them drops it.
        for percent, want in ((100, b"dirty"), (0, bytes(5))):
            write(fs.path("d/m3"), bytes(PAGE), sync="fsync")
            fsync_dir(fs.path("d"))
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                fd = os.open(fs.path("d/m3"), os.O_RDWR)
                m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED)
                m[100:105] = b"dirty"
                os.write(wfd, b"x")
                while True:
                    signal.pause()  # until killed
            os.read(rfd, 1)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(rfd)
            os.close(wfd)
            fs.crash(percent)
            expect("mapping of a killed process, crash keeping %d%%" %
                   percent, read(fs.path("d/m3"))[100:105], want)

        # Torn: 64 unsynced pages, half kept, each whole.
        old = bytes(range(256)) * (64 * PAGE // 256)
        write(fs.path("d/t"), old, sync="fsync")
        fsync_dir(fs.path("d"))
        new = bytes(255 - x for x in old)
        write(fs.path("d/t"), new)
        r = fs.crash(50, 7)
        got = read(fs.path("d/t"))
        kept = 0
        for p in range(64):
            pg = got[p * PAGE:(p + 1) * PAGE]
            if pg == new[p * PAGE:(p + 1) * PAGE]:
                kept += 1
            elif pg != old[p * PAGE:(p + 1) * PAGE]:
                sys.exit("FAIL: torn crash: page %d is neither old nor new" % p)
        expect("torn crash: pages kept as counted", kept, r["kept"])
        expect("torn crash: some kept, some dropped", 0 < kept < 64, True)
        # Written again: only the pages that were dropped are unsynced.
        write(fs.path("d/t"), new)
        r2 = fs.crash(50, 7)
        expect("torn crash again: the dropped pages are the unsynced ones",
               r2["kept"] + r2["dropped"], 64 - kept)
    finally:
        fs.close()
    expect("unmounted at EOF", os.path.ismount(mnt), False)


if __name__ == "__main__":
    main()
