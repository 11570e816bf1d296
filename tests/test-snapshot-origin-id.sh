#!/usr/bin/env bash
# nbdkit-snapshot
# A store belongs to one origin.  Another file of the same size, a copy
# of the right one, or the right file changed while the store was not
# open is refused at start-up with a clear error, and nothing in the
# store changes; snapshot-adopt-origin=true accepts a deliberate move.
# The same holds for a store with only a bitmap-only checkpoint, whose
# origin is written in place while the filter runs.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
make_origin $origin 8M

# store_sums: the checksums of the manifest, layers and maps.
store_sums ()
{
    (cd $store && md5sum manifest $(ls | grep -E '^(layer|dirty)-'))
}

# refused WANT ORIGIN [PARAMETER...]: the filter over ORIGIN must not
# start, saying WANT; the store's files do not change.
refused ()
{
    local want="$1" o="$2" before
    shift 2
    before=$(store_sums)
    start_fails "$want" $o snapshot-store=$store "$@"
    [ "$before" = "$(store_sums)" ] || fail "a refused start changed the store"
}

# A store with a snapshot and writes after it.
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x5a" * 200000, 3 << 20); h.flush()'
save_export $sock "" $tmp/live.img
stop_nbdkit $nbdkit_pid

# Another file of the same size.
make_origin $tmp/other.img 8M
dd if=/dev/urandom of=$tmp/other.img bs=64K count=4 conv=notrunc
refused "is not the file this store was made over" $tmp/other.img

# A copy of the right file: the same bytes, another inode.
cp $origin $tmp/copy.img
refused "is not the file this store was made over" $tmp/copy.img
refused "snapshot-adopt-origin=true" $tmp/copy.img

# The right file, changed while the store was not open.
cp $origin $tmp/saved-origin.img
dd if=/dev/urandom of=$origin bs=4096 count=1 conv=notrunc
refused "the origin does not read as it did" $origin

# Put back, it is accepted, and every view reads as before.
cp $tmp/saved-origin.img $origin
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store
verify_views $sock $tmp/live.img s1
stop_nbdkit $nbdkit_pid

# A deliberate move: snapshot-adopt-origin=true takes the copy, once;
# from then on the copy is the origin, and the old file is refused.
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $tmp/copy.img snapshot-store=$store \
             snapshot-adopt-origin=true
verify_views $sock $tmp/live.img s1
stop_nbdkit $nbdkit_pid
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $tmp/copy.img snapshot-store=$store
verify_views $sock $tmp/live.img s1
stop_nbdkit $nbdkit_pid
refused "is not the file this store was made over" $origin

# A bad value of the parameter.
refused "snapshot-adopt-origin" $tmp/copy.img snapshot-adopt-origin=maybe

# No snapshot, only a bitmap-only checkpoint: the origin is written in
# place while the filter runs, and checked after a clean stop.
store=$tmp/store2
cp $tmp/saved-origin.img $tmp/live2.img
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $tmp/live2.img snapshot-store=$store
nbdsnap -c $store create b1 --bitmap-only
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x6b" * 4096, 1 << 20); h.flush()'
stop_nbdkit $nbdkit_pid
# Unchanged: accepted (twice: each clean stop records it again).
for i in 1 2; do
    start_nbdkit -P $tmp/nbdkit.pid -U $sock \
                 --filter=$FILTER file $tmp/live2.img snapshot-store=$store
    stop_nbdkit $nbdkit_pid
done
# Written behind the filter's back (the write would be missing from
# dirty/b1): refused.
dd if=/dev/urandom of=$tmp/live2.img bs=4096 count=1 conv=notrunc
refused "the origin does not read as it did" $tmp/live2.img
