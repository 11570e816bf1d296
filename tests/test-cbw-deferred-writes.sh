#!/usr/bin/env bash
# nbdkit-snapshot
# Deferred writes of a cbw store: a small write to pages the newest
# snapshot's layer lacks is acknowledged before it reaches the origin,
# and waits in the filter until the layer is synced.  The thread that
# writes them into the origin is slowed down here (-D
# snapshot.apply_delay_ms) so that the client finds them waiting:
# - the origin file does not have the write yet, the live volume does,
#   and block status reports it as data, also over a hole;
# - a write or a zero over a waiting page lands after it;
# - writes of several pages, across a page boundary and into the short
#   last page of the volume read back exactly;
# - snap/s1 never changes; a snapshot taken while writes wait holds them;
# - a flush puts every write in the origin file;
# - kill -9 with writes waiting: every snapshot reads as it did, and a
#   waiting page of the live volume reads old or new.

SNAPSHOT_MODE=cbw
source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
# 8 MiB and 1000 bytes: the last page is short.  make_origin leaves
# the last 256K of each MiB a hole.
make_origin $origin $(( (8 << 20) + 1000 ))
cp $origin $tmp/s1.img
cp $origin $tmp/model.img

start ()
{
    start_store -D snapshot.apply_delay_ms=$1
}

start 3000
nbdsnap -c $store create s1

ORIGIN=$origin MODEL=$tmp/model.img S1=$tmp/s1.img \
nbdsh --base-allocation -u "$(nbd_uri $sock)" -c '
import os
origin, s1img = os.environ["ORIGIN"], os.environ["S1"]
size = h.get_size()
model = bytearray(open(os.environ["MODEL"], "rb").read())
s1 = nbd.NBD()
s1.connect_uri("'"$(nbd_uri $sock snap/s1)"'")

def on_disk(off, n):
    with open(origin, "rb") as f:
        f.seek(off)
        return f.read(n)

def write(data, off):
    h.pwrite(data, off)
    model[off:off + len(data)] = data

def check(off, n, what):
    assert h.pread(n, off) == bytes(model[off:off + n]), what
    assert s1.pread(n, off) == open(s1img, "rb").read()[off:off + n], \
        "snap/s1: " + what

def data_claimed(off, n):
    """Block status of [off, off+n) says data (not zero) throughout."""
    ext = []
    def cb(meta, o, entries, err):
        if meta == "base:allocation":
            ext.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(n, off, cb)
    covered = 0
    for length, flags in ext:
        assert not flags & nbd.STATE_ZERO, (off, ext)
        covered += length
    return covered > 0

# A write into a hole of the origin (the last 256K of the first MiB).
hole = (1 << 20) - 8192
assert on_disk(hole, 4096) == bytes(4096)
a = b"A" * 4096
write(a, hole)
# Acknowledged; the origin file has it not yet (3 s to go).
assert on_disk(hole, 4096) == bytes(4096), "the write was not deferred"
check(hole, 4096, "deferred write over a hole")
assert data_claimed(hole, 4096), "block status of the deferred write"

# A partial write over the waiting page lands after it.
write(b"B" * 512, hole + 1024)
check(hole, 4096, "write over a deferred page")
assert on_disk(hole, 4096) == bytes(model[hole:hole + 4096])

# A zero over a waiting page lands after it.
c = (2 << 20) + 40960
write(b"C" * 4096, c)
h.zero(4096, c)
model[c:c + 4096] = bytes(4096)
check(c, 4096, "zero over a deferred page")

# Several pages at once, and across a page boundary.
m = (3 << 20) + 8192
write(os.urandom(65536), m)
check(m - 4096, 65536 + 8192, "a deferred write of 16 pages")
x = (4 << 20) + 4096 - 50
write(os.urandom(100), x)
check(x - 4096, 8192, "a deferred write across a page boundary")

# The short last page.
write(os.urandom(1000), size - 1000)
check(size - 4096 - 1000, 4096 + 1000, "the short last page")

# Many small writes at once, each on pages of its own.
bufs = []
for i in range(64):
    off = (5 << 20) + i * 12288 + 100
    data = os.urandom(3000)
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    bufs.append(buf)
    h.aio_pwrite(buf, off)
    model[off:off + 3000] = data
while h.aio_in_flight() > 0:
    h.poll(-1)
check(5 << 20, 64 * 12288, "64 concurrent deferred writes")

open(os.environ["MODEL"], "wb").write(model)
'

# A snapshot taken while a write waits holds it.
d=$(( (6 << 20) + 4096 ))
nbdsh -u "$(nbd_uri $sock)" -c "h.pwrite(b'D' * 4096, $d)"
printf 'D%.0s' $(seq 4096) |
    dd of=$tmp/model.img bs=1 seek=$d conv=notrunc status=none
nbdsnap -c $store create s2
cp $tmp/model.img $tmp/s2.img
[ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/s2.img)" ] ||
    fail "snap/s2 lacks the write made before it was taken"

# A flush: everything is in the origin file.
nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()'
cmp $origin $tmp/model.img || fail "the origin file after a flush"
[ "$(export_md5 $sock)" = "$(md5 $tmp/model.img)" ] ||
    fail "the live volume after a flush"
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ] ||
    fail "snap/s1 changed"

# kill -9 while a write waits (10 s to go): the snapshots are intact;
# the page reads old or new.
stop_nbdkit $nbdkit_pid
start 10000
e=$(( (7 << 20) + 12288 ))
nbdsh -u "$(nbd_uri $sock)" -c "h.pwrite(b'E' * 4096, $e)"
kill -9 $nbdkit_pid
wait $nbdkit_pid || :
start 0
for s in s1 s2; do
    [ "$(export_md5 $sock snap/$s)" = "$(md5 $tmp/$s.img)" ] ||
        fail "snap/$s changed after kill -9"
done
EXPECT_OFF=$e MODEL=$tmp/model.img nbdsh -u "$(nbd_uri $sock)" -c '
import os
off = int(os.environ["EXPECT_OFF"])
model = open(os.environ["MODEL"], "rb").read()
got = h.pread(4096, off)
assert got in (model[off:off + 4096], b"E" * 4096), "page after kill -9"
rest = h.pread(h.get_size() - off - 4096, off + 4096)
assert h.pread(off, 0) == model[:off] and rest == model[off + 4096:], \
    "the live volume outside the page after kill -9"
'
stop_nbdkit $nbdkit_pid
check_clean $store
