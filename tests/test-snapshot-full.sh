#!/usr/bin/env bash
# nbdkit-snapshot
# A full store.  snapshot-max-size bounds the data the store holds:
#
#  - row (its live data is in the store): a write that would grow it
#    past the bound fails with ENOSPC, and every snapshot is kept;
#    snapshot-full=invalidate is refused at start-up, saying why;
#  - cbw with snapshot-full=error: the same, and the origin is not
#    overwritten where the old data could not be kept;
#  - cbw with snapshot-full=invalidate (the default): the oldest
#    snapshot goes to make room (a warning in the log, and list and
#    info say which and when); it goes on as a bitmap-only checkpoint;
#    the writes succeed.
#
# Then a real ENOSPC from a small tmpfs under a cbw store (as root):
# the client gets ENOSPC, the origin keeps its data where it could not
# be kept, and once space is freed everything works again with nothing
# lost.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

sock=$tmp/nbd.sock

# try_write OFFSET LENGTH BYTE: write with nbdsh; print ok or the
# errno name.
try_write ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
import errno
try:
    h.pwrite(bytes([$3]) * $2, $1)
    h.flush()
    print('ok')
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.errnum))
"
}

# origin_range FILE OFFSET LENGTH: md5 of a range of a file.
origin_range ()
{
    dd if="$1" bs=4096 skip=$(( $2 / 4096 )) count=$(( $3 / 4096 )) \
       status=none | md5sum | cut -d' ' -f1
}

# ---- row ----
origin=$tmp/row.img
store=$tmp/row-store
make_origin $origin 16M
start_fails "snapshot-full=invalidate: the store $store is row" $origin \
            snapshot-store=$store snapshot-max-size=1M \
            snapshot-full=invalidate
start_store -- snapshot-max-size=1M
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/row-s1.img
[ "$(try_write 0 524288 0x11)" = ok ]
[ "$(try_write 1048576 1048576 0x12)" = ENOSPC ] ||
    fail "row: a write past snapshot-max-size did not fail with ENOSPC"
grep -F "snapshot-max-size=1048576: the store is full" $nbdkit_log
# Rewriting what the layer holds needs no room.
[ "$(try_write 0 524288 0x13)" = ok ]
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/row-s1.img)" ] ||
    fail "row: snap/s1 changed"
stop_nbdkit $nbdkit_pid

# ---- cbw, snapshot-full=error ----
origin=$tmp/cbw-e.img
store=$tmp/cbw-e-store
make_origin $origin 16M
start_store -- snapshot-mode=cbw snapshot-max-size=1M snapshot-full=error
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/cbw-e-s1.img
[ "$(try_write 0 524288 0x21)" = ok ]
before=$(origin_range $origin 4194304 2097152)
[ "$(try_write 4194304 2097152 0x22)" = ENOSPC ] ||
    fail "cbw, error: a write past snapshot-max-size did not fail"
[ "$(origin_range $origin 4194304 2097152)" = "$before" ] ||
    fail "cbw, error: the origin was overwritten where nothing was kept"
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/cbw-e-s1.img)" ] ||
    fail "cbw, error: snap/s1 changed"
nbdsnap -c $store --json list |
    jq -e '.max_size == 1048576 and
           [.checkpoints[] | .kind] == ["snapshot"]'
stop_nbdkit $nbdkit_pid

# ---- cbw, snapshot-full=invalidate (the default) ----
origin=$tmp/cbw-i.img
store=$tmp/cbw-i-store
make_origin $origin 16M
start_store -- snapshot-mode=cbw snapshot-max-size=1M
nbdsnap -c $store create s1
[ "$(try_write 0 786432 0x31)" = ok ]
nbdsnap -c $store create s2
save_export $sock snap/s2 $tmp/cbw-i-s2.img
# s1 holds 768K: 512K more does not fit; s1 goes, s2 stays.
[ "$(try_write 8388608 524288 0x32)" = ok ] ||
    fail "cbw, invalidate: the write failed"
grep -F "snapshot 's1' was invalidated to make room" $nbdkit_log
nbdsnap -c $store --json list > $tmp/list.json
cat $tmp/list.json
jq -e '[.checkpoints[] | [.name, .kind, (.invalidated != null)]] ==
       [["s1", "bitmap", true], ["s2", "snapshot", false]]' $tmp/list.json
nbdsnap -c $store list | grep -F "s1: snapshot invalidated at"
nbdsnap -c $store info s1 | grep "^invalidated: "
[ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/cbw-i-s2.img)" ] ||
    fail "cbw, invalidate: snap/s2 changed"
# s1 still tracks its changed blocks.
nbdinfo --map "$(nbd_uri $sock dirty/s1)" | grep -w data
if nbdinfo --size "$(nbd_uri $sock snap/s1)" 2>/dev/null; then
    fail "snap/s1 can still be opened after it was invalidated"
fi
# The store keeps it across a restart.
stop_nbdkit $nbdkit_pid
start_store -- snapshot-max-size=1M
nbdsnap -c $store --json info s1 |
    jq -e '.checkpoint.kind == "bitmap" and .checkpoint.invalidated != null'
[ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/cbw-i-s2.img)" ]
stop_nbdkit $nbdkit_pid

# ---- A real ENOSPC under a cbw store ----
if [ "$(id -u)" -ne 0 ]; then
    echo "$0: not root: the tmpfs part is skipped"
    exit 0
fi
mkdir $tmp/small
mount -t tmpfs -o size=4M tmpfs $tmp/small
cleanup_fn umount -l $tmp/small
origin=$tmp/cbw-n.img
store=$tmp/small/store
make_origin $origin 16M
start_store -- snapshot-mode=cbw
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/cbw-n-s1.img
# Fill the tmpfs, leaving less room than the next write keeps.
df $tmp/small
dd if=/dev/zero of=$tmp/small/filler bs=64K count=1000 status=none || :
df $tmp/small
before=$(origin_range $origin 8388608 2097152)
[ "$(try_write 8388608 2097152 0x41)" = ENOSPC ] ||
    fail "cbw: a write whose old data cannot be kept did not fail with ENOSPC"
[ "$(origin_range $origin 8388608 2097152)" = "$before" ] ||
    fail "cbw: the origin was overwritten though its old data was not kept"
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/cbw-n-s1.img)" ] ||
    fail "cbw: snap/s1 changed on ENOSPC"
# Free the space: the same write goes through, nothing was lost.
rm $tmp/small/filler
[ "$(try_write 8388608 2097152 0x41)" = ok ]
save_export $sock "" $tmp/cbw-n-live.img
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/cbw-n-s1.img)" ] ||
    fail "cbw: snap/s1 changed after the space came back"
stop_nbdkit $nbdkit_pid
start_store
verify_views $sock $tmp/cbw-n-live.img
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/cbw-n-s1.img)" ]
stop_nbdkit $nbdkit_pid
