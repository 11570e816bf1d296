#!/usr/bin/env bash
# nbdkit-snapshot
# A store outlives nbdkit: write, snapshot, write, stop nbdkit
# cleanly, start it again on the same store and origin, and every
# snapshot and the live data are back, with the same metadata.  Then
# the same again with more snapshots, with snapshot-create at start-up
# and with a read-only (-r) server.

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

# verify SNAPSHOT...: the live volume reads as $REF and each
# snapshot as $tmp/SNAPSHOT.img.
verify ()
{
    local s
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ] ||
        fail "the live volume is not as written"
    for s in "$@"; do
        [ "$(export_md5 $sock snap/$s)" = "$(md5 $tmp/$s.img)" ] ||
            fail "snap/$s does not read as it was taken"
    done
}

# The store and its checkpoints as nbdsnap lists them, keys sorted,
# without the space on disk (a restart may allocate or free some).
checkpoints ()
{
    nbdsnap -c $store --json list > $tmp/checkpoints.json
    jq -S 'del(.disk_bytes, .checkpoints[].disk_bytes)' $tmp/checkpoints.json
}

make_origin $origin 8M
cp $origin $REF
start

nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x01, 200000), 100000)
'
nbdsnap -c $store create s1
cp $REF $tmp/s1.img
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x02, 65536), 0)
w(pat(0x03, 1000), 6000000)
z(300000, 3000000)
'
nbdsnap -c $store create s2
cp $REF $tmp/s2.img
# Written with no flush: a clean shutdown keeps it too.
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x04, 70000), 90000)
w(pat(0x05, 512), 8388608 - 512)
'
verify s1 s2
checkpoints > $tmp/before.json
cat $tmp/before.json
stop_nbdkit $nbdkit_pid

# The same block size spelled another way is the same store.
start snapshot-block-size=65536
verify s1 s2
checkpoints > $tmp/after.json
diff -u $tmp/before.json $tmp/after.json

# More writes and a third snapshot, then restart again.
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x06, 131072), 65536 * 10)
'
nbdsnap -c $store create s3
cp $REF $tmp/s3.img
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x07, 4096), 65536 * 11 + 100)
'
checkpoints > $tmp/before.json
stop_nbdkit $nbdkit_pid
start
verify s1 s2 s3
checkpoints > $tmp/after.json
diff -u $tmp/before.json $tmp/after.json
stop_nbdkit $nbdkit_pid

# snapshot-create=NAME takes a snapshot at start-up.
start snapshot-create=s4
cp $REF $tmp/s4.img
verify s1 s2 s3 s4
checkpoints > $tmp/list.json
jq -e '[.checkpoints[].name] == ["s1", "s2", "s3", "s4"]' $tmp/list.json
jq -e '.checkpoints[3].changed_blocks == 0' $tmp/list.json
nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c '
w(pat(0x08, 65536), 65536 * 12)
'
verify s1 s2 s3 s4
checkpoints > $tmp/before.json
stop_nbdkit $nbdkit_pid

# A read-only server: everything reads the same and nothing can be
# written, even to the live volume.
start -r
verify s1 s2 s3 s4
nbdsh -u "$(nbd_uri $sock)" -c '
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as ex:
    assert ex.errno == "EPERM", ex
else:
    raise AssertionError("write to a read-only live volume succeeded")
'
verify s1 s2 s3 s4
stop_nbdkit $nbdkit_pid

start
verify s1 s2 s3 s4
checkpoints > $tmp/after.json
diff -u $tmp/before.json $tmp/after.json

# The origin was frozen by s1 (row), or holds the live volume, the
# writes of every phase (cbw).
check_origin $tmp/s1.img $REF
