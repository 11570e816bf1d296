#!/usr/bin/env bash
# nbdkit-snapshot
# Guarantee 5: a full disk.  The store lives on a small tmpfs; writes
# into the layer (cbw: the old contents kept there before the origin
# is overwritten) run out of space.  ENOSPC reaches the client, every
# write acknowledged (and flushed) before reads back, the snapshot is
# unchanged, and after a restart on the still-full store all of that
# holds again.

source ./functions.sh
set -e
set -x

requires_root
requires nbdsh --version
requires nbdcopy --version
requires mount --version

origin=$tmp/origin.img
mnt=$tmp/mnt
store=$mnt/store
sock=$tmp/nbd.sock

mkdir $mnt
mount -t tmpfs -o size=6M tmpfs $mnt || skip "cannot mount a tmpfs"
cleanup_fn umount -l $mnt

make_origin $origin 32M
start ()
{
    start_store
}
start
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img

# Write 1M chunks of distinct data (each flushed) until the store is
# full; record how many were acknowledged.
nbdsh -u "$(nbd_uri $sock)" -c "
import errno
ok = 0
try:
    for i in range(24):
        h.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
        h.flush()
        ok = i + 1
except nbd.Error as e:
    print('error after %d chunks: %s' % (ok, e))
    assert e.errno == 'ENOSPC', 'expected ENOSPC, got %s' % e.errno
else:
    raise AssertionError('24 MiB fitted in a 6 MiB store')
open('$tmp/ok', 'w').write('%d\n' % ok)
"
ok=$(cat $tmp/ok)
[ "$ok" -ge 1 ] || fail "no write succeeded before the store filled"

check ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
for i in range($ok):
    assert h.pread(1 << 20, i << 20) == bytes([i + 1]) * (1 << 20), i
"
    [ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ] ||
        fail "snap/s1 changed"
}
check

# Restart on the full store: it opens, and reads the same.
stop_nbdkit $nbdkit_pid KILL
start
check
nbdsnap -c $store --json list | jq -e '[.checkpoints[].name] == ["s1"]'
