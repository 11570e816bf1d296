#!/usr/bin/env bash
# nbdkit-snapshot
# A store whose disk fails with EIO: fault.c, preloaded into nbdkit,
# fails reads, writes and syncs of the store's files while a trigger
# file exists.  A store with snapshots s1, s2 and then a bitmap-only
# checkpoint c1 (the newest: every write records its blocks in the
# mapped dirty map and intent.map, section 3 of docs/guarantees.md).
#
# 1. Every 5th read or write of the store's files fails.  The client's
#    requests that meet one get EIO, and only those: each request that
#    succeeds is checked against a model (a write that fails is done
#    again until it succeeds, as a client that retries does), and so
#    are reads of snap/s1 and snap/s2.  Control requests whose files
#    cannot be written fail, say why, and change nothing.  With the
#    disk healthy again the server goes on: the live volume reads as
#    the model, snap/s1, snap/s2 and dirty/s1/s2 as before, dirty/c1
#    marks every block changed since c1.  A clean stop seals the maps
#    as they are (a failed delete's fold included), and the store
#    starts again.
# 2. A sync fails: first of the dirty map (of c2, a bitmap-only
#    checkpoint taken just before, so that the writes set new bits),
#    then (after a restart) of a layer's data.  The client's flush (in cbw, the write whose old
#    contents could not be kept) gets EIO, and from then on the store
#    takes no more changes: writes and flushes fail with EIO even once
#    the disk is healthy (a sync that failed is never followed by one
#    that reports success for the same data), and create says why.
#    Reads go on.  Stopped, the store passes nbdsnap check; restarted,
#    every page written since the last good flush reads as before or
#    as written, the rest as the model, the snapshots as before, and
#    dirty/c1 marks every block of the regions written (the dirty map
#    is not trusted after the failed sync).  Writes work again.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

fault=$abs_top_builddir/tests/.libs/libfault.so
[ -f $fault ] || fail "$fault not found (make check builds it)"

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
trigger=$tmp/eio
make_origin $origin 8M

# The first 6 MiB take the writes of part 1; the next MiB those of the
# dirty map's failed sync, the last MiB those of the layer's: no write
# reaches them after s2 before then (in cbw, their old contents must
# still be kept in s2's layer when they are written).
limit=$(( 6 << 20 ))

start_faulty ()
{
    LD_PRELOAD=$fault FAULT_STORE_EIO=$trigger FAULT_STORE_DIR=$store \
        FAULT_STORE_EIO_LOG=$tmp/faults.log \
        start_store -D snapshot.intent_clear_ms=0
}

# writes SEED: random writes within the first $limit bytes, flushed.
writes ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
import random
rng = random.Random($1)
for i in range(30):
    n = rng.randint(1, 150000)
    h.pwrite(rng.randbytes(n), rng.randrange(0, $limit - n))
h.zero(200000, rng.randrange(0, $limit - 200000))
h.flush()
"
}

# check_dirty_c1 [all]: dirty/c1 reads the live contents ($tmp/model.img)
# where it reports a block changed, zeros elsewhere, and reports every
# block that differs from c1 ($tmp/c1.img) as changed; with "all", it
# reports every block changed.
check_dirty_c1 ()
{
    C1=$tmp/c1.img MODEL=$tmp/model.img ALL=${1-} \
    nbdsh -c 'h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)' \
          -c "h.connect_uri('$(nbd_uri $sock dirty/c1)')" -c '
import os
c1 = open(os.environ["C1"], "rb").read()
live = open(os.environ["MODEL"], "rb").read()
size = h.get_size()
bs = 65536
marked = []
def cb(metacontext, off, entries, err):
    if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
        marked.extend(entries)
off = 0
while off < size:
    marked.clear()
    h.block_status(size - off, off, cb)
    for i in range(0, len(marked), 2):
        n = min(marked[i], size - off)
        changed = not (marked[i + 1] & nbd.STATE_ZERO)
        for b in range(off, off + n, bs):
            got = h.pread(bs, b)
            if changed:
                assert got == live[b:b + bs], "dirty/c1: block at %d" % b
            else:
                assert not os.environ["ALL"], "block at %d not marked" % b
                assert got == bytes(bs), "dirty/c1: unmarked %d" % b
                assert live[b:b + bs] == c1[b:b + bs], \
                    "block at %d changed since c1 and is not marked" % b
        off += n
'
}

# check_views WHEN [all]: the live volume reads as the model, the
# snapshots and dirty/s1/s2 as before, dirty/c1 as check_dirty_c1 says.
check_views ()
{
    [ "$(export_md5 $sock)" = "$(md5 $tmp/model.img)" ] ||
        fail "$1: the live volume does not read as the model"
    for e in snap/s1 snap/s2 dirty/s1/s2; do
        [ "$(export_md5 $sock $e)" = "$(md5 $tmp/${e//\//-}.img)" ] ||
            fail "$1: $e changed"
    done
    check_dirty_c1 ${2-}
}

start_faulty
writes 1
nbdsnap -c $store create s1
writes 2
nbdsnap -c $store create s2
writes 3
nbdsnap -c $store create --bitmap-only c1
for e in snap/s1 snap/s2 dirty/s1/s2 ""; do
    name=${e//\//-}
    save_export $sock "$e" $tmp/${name:-c1}.img
done
cp $tmp/c1.img $tmp/model.img

# ---- 1. Reads and writes fail ----

echo "ops=read,write every=5" > $trigger
MODEL=$tmp/model.img S1=$tmp/snap-s1.img S2=$tmp/snap-s2.img \
nbdsh -u "$(nbd_uri $sock)" -c '
import os, random
rng = random.Random(11)
size = h.get_size()
limit = '$limit'
model = bytearray(open(os.environ["MODEL"], "rb").read())
snaps = []
for name, img in (("s1", "S1"), ("s2", "S2")):
    s = nbd.NBD()
    s.connect_uri("'"$(nbd_uri $sock)"'".replace(":///", ":///snap/" + name))
    snaps.append((s, open(os.environ[img], "rb").read()))
failed = {}

def retry(what, fn):
    for tries in range(100):
        try:
            return fn()
        except nbd.Error as e:
            assert e.errno == "EIO", "%s: %s" % (what, e)
            failed[what] = failed.get(what, 0) + 1
    raise AssertionError("%s failed 100 times in a row" % what)

def length():
    return rng.choice([512, 4096, 65536, rng.randint(1, 150000)])

for i in range(250):
    r = rng.random()
    n = length()
    off = rng.randrange(0, limit - n)
    if r < 0.4:
        data = rng.randbytes(n)
        retry("write", lambda: h.pwrite(data, off))
        model[off:off + n] = data
    elif r < 0.45:
        retry("zero", lambda: h.zero(n, off))
        model[off:off + n] = bytes(n)
    elif r < 0.55:
        retry("flush", lambda: h.flush())
    elif r < 0.6:
        # Writes in flight at once, in distinct MiB slots, then a flush.
        reqs = []
        for s in rng.sample(range(limit >> 20), 5):
            n = rng.randint(1, 65536)
            off = (s << 20) + rng.randrange(0, (1 << 20) - n + 1)
            data = rng.randbytes(n)
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            reqs.append((off, data, buf, h.aio_pwrite(buf, off)))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for off, data, buf, cookie in reqs:
            try:
                h.aio_command_completed(cookie)
            except nbd.Error as e:
                assert e.errno == "EIO", e
                failed["write"] = failed.get("write", 0) + 1
                retry("write", lambda: h.pwrite(data, off))
            model[off:off + len(data)] = data
        retry("flush", lambda: h.flush())
    elif r < 0.8:
        got = retry("read", lambda: h.pread(n, off))
        assert got == model[off:off + n], "live: read at %d" % off
    else:
        s, img = rng.choice(snaps)
        off = rng.randrange(0, size - n)
        got = retry("read", lambda: s.pread(n, off))
        assert got == img[off:off + n], "%s: read at %d" % (s, off)
print("failed:", failed)
assert failed.get("write") and failed.get("read"), failed
open(os.environ["MODEL"], "wb").write(model)
'
grep -E '^(pread|pwrite) ' $tmp/faults.log | sort | uniq -c

# A zero and a write of whole pages fail (a hole punched or data
# written into a layer; in cbw, the old contents kept), and work once
# the disk is healthy.  (Pages of the last MiB: in cbw the attempts
# keep nothing there.)
echo "ops=write files=.data" > $trigger
MODEL=$tmp/model.img TRIGGER=$trigger nbdsh -u "$(nbd_uri $sock)" -c '
import os
model = bytearray(open(os.environ["MODEL"], "rb").read())
off = (8 << 20) - (4 << 12)
for op in (lambda: h.zero(8192, off), lambda: h.pwrite(b"z" * 8192, off)):
    try:
        op()
        assert False, "a write into the failing layer succeeded"
    except nbd.Error as e:
        assert e.errno == "EIO", e
os.remove(os.environ["TRIGGER"])
h.zero(8192, off)
h.pwrite(b"z" * 8192, off + 8192)
h.flush()
model[off:off + 16384] = bytes(8192) + b"z" * 8192
open(os.environ["MODEL"], "wb").write(model)
'
grep -E '^(fallocate|pwrite) layer-.*[.]data$' $tmp/faults.log | tail -2

# Control requests whose files cannot be written fail, and say why.
echo "ops=write files=manifest" > $trigger
expect_exit 1 nbdsnap -c $store create s3
expect_error_line "nbdsnap: create: cannot save the manifest in $store: Input/output error"
echo "ops=write files=dirty- every=1" > $trigger
expect_exit 1 nbdsnap -c $store create --bitmap-only c3
grep -F "cannot create the files of 'c3'" $err
expect_exit 1 nbdsnap -c $store delete c1
expect_error_line "nbdsnap: delete: cannot delete checkpoint 'c1': Input/output error"
rm $trigger
[ "$(nbdsnap -c $store --json list | jq -c '[.checkpoints[].name]')" = \
  '["s1","s2","c1"]' ] || fail "the failed requests changed the list"

nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()'
check_views "with the disk healthy again"
# A clean stop seals the maps as they are in memory, the failed delete's
# fold included: the files must hold it too, or the next start refuses
# them.
stop_nbdkit $nbdkit_pid
check_clean $store
start_faulty
check_views "after a clean stop"

# ---- 2. A sync fails ----

# sync_fails FILES FIRST-PAGE: with syncs of the store's files whose
# name contains FILES failing, write 16 pages from FIRST-PAGE on, then
# flush: the flush (or in cbw a write) must fail with EIO, and from
# then on every write and flush, the disk healthy or not.  The pages
# written go to $tmp/uncertain (offset, then the data written).
sync_fails ()
{
    echo "ops=sync files=$1" > $trigger
    MODEL=$tmp/model.img OUT=$tmp/uncertain TRIGGER=$trigger \
    nbdsh -u "$(nbd_uri $sock)" -c '
import os, random, pickle
rng = random.Random('$2')
model = open(os.environ["MODEL"], "rb").read()
pages = sorted(rng.sample(range('$2', '$2' + 256), 16))
new = {}
errors = 0
for p in pages:
    new[p] = rng.randbytes(4096)
    try:
        h.pwrite(new[p], p * 4096)
    except nbd.Error as e:
        assert e.errno == "EIO", e
        errors += 1
try:
    h.flush()
    assert False, "the flush succeeded although a sync failed"
except nbd.Error as e:
    assert e.errno == "EIO", e
os.remove(os.environ["TRIGGER"])
# The disk is healthy again: the store still takes no changes.
for op in (lambda: h.pwrite(b"x" * 4096, pages[0] * 4096),
           lambda: h.zero(4096, pages[0] * 4096),
           lambda: h.flush()):
    try:
        op()
        assert False, "a change succeeded after the failed sync"
    except nbd.Error as e:
        assert e.errno == "EIO", e
# Reads go on.
for p in pages:
    got = h.pread(4096, p * 4096)
    assert got in (new[p], model[p * 4096:(p + 1) * 4096]), p
print("writes failed:", errors)
pickle.dump(new, open(os.environ["OUT"], "wb"))
'
    grep -F "fdatasync " $tmp/faults.log
    expect_exit 1 nbdsnap -c $store create s3
    grep -F "the store had an I/O error" $err
    [ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/snap-s1.img)" ] ||
        fail "snap/s1 changed"
    stop_nbdkit $nbdkit_pid
    grep -E "snapshot: [^ ]*$1[^ ]*: fdatasync: Input/output error: .* the store takes no more changes" $nbdkit_log
    check_clean $store

    start_faulty
    # Each page written reads as before or as written; the model takes
    # what it reads.
    MODEL=$tmp/model.img IN=$tmp/uncertain \
    nbdsh -u "$(nbd_uri $sock)" -c '
import os, pickle
model = bytearray(open(os.environ["MODEL"], "rb").read())
new = pickle.load(open(os.environ["IN"], "rb"))
for p, data in new.items():
    got = h.pread(4096, p * 4096)
    assert got in (data, model[p * 4096:(p + 1) * 4096]), p
    model[p * 4096:(p + 1) * 4096] = got
open(os.environ["MODEL"], "wb").write(model)
'
    check_views "after the restart" all
    # The store takes changes again.
    nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x55" * 4096, 0)
h.flush()
assert h.pread(4096, 0) == b"\x55" * 4096
'
    printf '\x55%.0s' {1..4096} |
        dd of=$tmp/model.img conv=notrunc status=none
}

nbdsnap -c $store create --bitmap-only c2
sync_fails dirty- $(( 6 << 8 ))
sync_fails .data $(( 7 << 8 ))

check_views "at the end" all
stop_nbdkit $nbdkit_pid
check_clean $store
