#!/usr/bin/env bash
# nbdkit-snapshot
# An origin that fails reads and writes with EIO (nbdkit's error
# filter under the snapshot filter, 20% of reads and writes while a
# trigger file exists).  A client's request that meets a failure gets
# EIO; nothing else is harmed: every read matches what was written,
# snap/s1 still reads as the volume did when it was taken (in cbw mode
# a write whose old contents could not be kept for s1 must not have
# reached the origin), the stopped store passes nbdsnap check, and a
# restart over the healthy origin serves the same.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
trigger=$tmp/inject
make_origin $origin 16M
cp $origin $tmp/s1.img

start_faulty ()
{
    start_nbdkit -P $tmp/nbdkit.pid -U $sock --filter=$FILTER \
        --filter=error file $origin snapshot-store=$store \
        error-pread=EIO error-pread-rate=20% \
        error-pwrite=EIO error-pwrite-rate=20% error-file=$trigger
}

start_faulty
nbdsnap -c $store create s1
touch $trigger

# Random writes and reads, each checked against a model.  A write that
# fails leaves its range undefined (the NBD protocol says so: in row
# mode the pages before the failed one may be written), so the client
# writes it again until it succeeds, as a client that retries does.
# Some requests must fail, and most must not.
cp $tmp/s1.img $tmp/model.img
MODEL=$tmp/model.img nbdsh -u "$(nbd_uri $sock)" -c '
import os, random
rng = random.Random(7)
size = h.get_size()
model = bytearray(open(os.environ["MODEL"], "rb").read())
ok = failed = 0
for i in range(400):
    n = rng.choice([512, 4096, 65536, rng.randint(1, 100000)])
    off = rng.randrange(0, size - n)
    try:
        if rng.random() < 0.6:
            data = rng.randbytes(n)
            for tries in range(100):
                try:
                    h.pwrite(data, off)
                    break
                except nbd.Error as e:
                    assert e.errno == "EIO", e
                    failed += 1
            else:
                raise Exception("a write at %d failed 100 times" % off)
            model[off:off + n] = data
        else:
            got = h.pread(n, off)
            assert got == bytes(model[off:off + n]), "read at %d" % off
        ok += 1
    except nbd.Error as e:
        assert e.errno == "EIO", e
        failed += 1
print("ok", ok, "failed", failed)
assert failed > 0 and ok > failed, (ok, failed)
open(os.environ["MODEL"], "wb").write(model)
'
rm $trigger

check_views ()
{
    [ "$(export_md5 $sock)" = "$(md5 $tmp/model.img)" ] ||
        fail "$1: the live volume lost or gained a write"
    [ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ] ||
        fail "$1: snap/s1 changed"
}
nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()'
check_views "with the origin healthy again"
check_origin $tmp/s1.img $tmp/model.img
stop_nbdkit $nbdkit_pid
check_clean $store

start_nbdkit -P $tmp/nbdkit.pid -U $sock --filter=$FILTER \
    file $origin snapshot-store=$store
check_views "after a restart"
