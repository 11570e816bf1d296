#!/usr/bin/env bash
# nbdkit-snapshot
# Crashes.  Writes acknowledged after a flush, or with FUA, survive
# kill -9, and every snapshot reads exactly as when it was taken.
# First with a quiet server, then with kill -9 arriving while a
# background client is writing (and flushing now and then).

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
REF=$tmp/ref.img
export REF

start ()
{
    start_nbdkit -P $tmp/nbdkit.pid -U $sock \
                 --filter=$FILTER file $origin snapshot-store=$store "$@"
}

crash ()
{
    stop_nbdkit $nbdkit_pid KILL
}

# verify_snaps SNAPSHOT...: each reads as $tmp/SNAPSHOT.img.
verify_snaps ()
{
    local s
    for s in "$@"; do
        [ "$(export_md5 $sock snap/$s)" = "$(md5 $tmp/$s.img)" ] ||
            fail "snap/$s does not read as it was taken"
    done
}

make_origin $origin 32M
cp $origin $REF
start

# Before any snapshot, a flushed write lands in the origin.
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x01, 100000), 50000)
h.flush()
'
nbdsnap -c $store create s1
cp $REF $tmp/s1.img

# After it: flushed writes, a FUA write, a zero with FUA.
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
assert h.can_fua()
w(pat(0x02, 65536), 65536 * 4)
w(pat(0x03, 3000), 65536 * 6 + 17)
h.flush()
w(pat(0x04, 5000), 65536 * 8 + 1000, nbd.CMD_FLAG_FUA)
z(70000, 65536 * 20 + 5, nbd.CMD_FLAG_FUA)
'
nbdsnap -c $store create s2
cp $REF $tmp/s2.img
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x05, 65536 * 2), 65536 * 30)
h.flush()
w(pat(0x06, 512), 65536 * 31 + 512, nbd.CMD_FLAG_FUA)
'
# Keep what is durable now; an unflushed write comes next and may
# or may not survive, so it goes only to a scratch copy.
cp $REF $tmp/durable.img
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x07" * 65536, 65536 * 40)
'
crash
start

verify_snaps s1 s2
# Live: everything but block 40 is exactly as written.
save_export $sock "" $tmp/live.img
cmp -n $((65536 * 40)) $tmp/live.img $tmp/durable.img
cmp -i $((65536 * 41)) $tmp/live.img $tmp/durable.img
nbdsnap -c $store --json list > $tmp/list.json
jq -e '[.checkpoints[].name] == ["s1", "s2"]' $tmp/list.json

# From here the live volume is whatever it read after the crash.
cp $tmp/live.img $REF

# A snapshot taken just before the crash is there afterwards.
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x08, 65536), 65536 * 50)
'
nbdsnap -c $store create s3
cp $REF $tmp/s3.img
crash
start
verify_snaps s1 s2 s3
[ "$(export_md5 $sock)" = "$(md5 $REF)" ]

# Now kill -9 while a client writes.  The writer goes round 1024
# slots of 4K (4M at offset 4M), write j filling slot j % 1024 with
# the 32-bit number j; it flushes after every 16 writes and records
# in $tmp/flushed how many writes were then flushed.  It stops at the
# first error (the server going away), or after a million writes.
slots=1024
base=$((4 * 1024 * 1024))
cat > $tmp/writer.py <<'EOF'
import os
slots = int(os.environ["SLOTS"])
base = int(os.environ["BASE"])
progress = os.environ["PROGRESS"]
try:
    for j in range(1000000):
        h.pwrite(j.to_bytes(4, "little") * 1024, base + 4096 * (j % slots))
        if j % 16 == 15:
            h.flush()
            with open(progress + ".tmp", "w") as f:
                f.write("%d\n" % (j + 1))
            os.rename(progress + ".tmp", progress)
except nbd.Error:
    pass
EOF

rm -f $tmp/flushed
SLOTS=$slots BASE=$base PROGRESS=$tmp/flushed \
    nbdsh -u "$(nbd_uri $sock)" -c "exec(open('$tmp/writer.py').read())" &
writer=$!
cleanup_fn kill $writer

flushed_at_least ()
{
    [ -s $tmp/flushed ] && [ "$(cat $tmp/flushed)" -ge "$1" ]
}

# check_area IMAGE FLUSHED ISSUED: the writer's area of IMAGE holds,
# in each 32-bit word of slot s, a write to slot s no older than the
# newest one among the first FLUSHED writes, and not one of those from
# ISSUED on, which had not been sent; if none of the first FLUSHED
# writes went to slot s, the word may also be as it was ($REF).
# Unflushed writes may land in part: hence word by word.
cat > $tmp/check_area.py <<'EOF'
import sys
from array import array
image, ref = sys.argv[1], sys.argv[2]
base, slots, flushed, issued = (int(x) for x in sys.argv[3:])
def words(path):
    with open(path, "rb") as f:
        f.seek(base)
        a = array("I")
        a.frombytes(f.read(4096 * slots))
        return a
got, old = words(image), words(ref)
for i, v in enumerate(got):
    s = i // 1024
    if flushed > s:
        newest_flushed = s + slots * ((flushed - 1 - s) // slots)
        ok = v % slots == s and newest_flushed <= v < issued
    else:
        ok = v == old[i] or (v % slots == s and v < issued)
    assert ok, "%s: slot %d word %d: %d (flushed %d, issued < %d)" % \
        (image, s, i % 1024, v, flushed, issued)
EOF
check_area ()
{
    python3 $tmp/check_area.py $1 $REF $base $slots $2 $3
}

# Snapshots taken while it writes.  Every write acknowledged before
# the request is in the snapshot, none sent after the reply.  (The
# writer may be up to 16 writes past what $tmp/flushed says.)  Saved
# at once, they must never change after that.
wait_for flushed_at_least 64
for s in s4 s5; do
    before=$(cat $tmp/flushed)
    nbdsnap -c $store create $s
    after=$(cat $tmp/flushed)
    save_export $sock snap/$s $tmp/$s.img
    check_area $tmp/$s.img $before $((after + 16))
    wait_for flushed_at_least $((after + 1000))
done
verify_snaps s4 s5

crash
wait $writer || true
flushed=$(cat $tmp/flushed)
echo "the writer had flushed $flushed writes"
start

verify_snaps s1 s2 s3 s4 s5
nbdsnap -c $store --json list > $tmp/list.json
jq -e '[.checkpoints[].name] == ["s1", "s2", "s3", "s4", "s5"]' $tmp/list.json

# Every flushed write is there.  (The writer stopped at the first
# write after the crash: at most 16 past its last flush.)  Outside its
# area the live volume is as before.
save_export $sock "" $tmp/live.img
check_area $tmp/live.img $flushed $((flushed + 16))
cmp -n $base $tmp/live.img $REF
cmp -i $((base + 4096 * slots)) $tmp/live.img $REF

# The origin was frozen by s1 (row), or holds the live volume as it
# reads after the crash (cbw).
check_origin $tmp/s1.img $tmp/live.img
