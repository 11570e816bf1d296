#!/usr/bin/env bash
# nbdkit-snapshot
# A file system in a backup chain: an ext4 volume, backed up full, then
# changed and backed up again.  Each restore point, served by the
# snapstore plugin, through nbdfuse and a read-only loop mount, holds
# the files as they were, and its file system is clean.

source ./functions.sh
set -e
set -x

requires_root
requires_fuse
requires mkfs.ext4 -V
requires losetup --version
requires mountpoint --version
requires e2fsck -V
requires nbdcopy --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
chain=$tmp/chain
psock=$tmp/plugin.sock

# fuse_mount DIR URI: serve URI read-only as DIR/nbd with nbdfuse.
fuse_mount ()
{
    local dir="$1" uri="$2" pid
    mkdir -p "$dir"
    rm -f "$dir.pid"
    nbdfuse -r -P "$dir.pid" "$dir" "$uri" &
    pid=$!
    cleanup_fn fuse_unmount "$dir" "$pid"
    wait_for test -s "$dir.pid"
    wait_for test -f "$dir/nbd"
}

# checksums DIR: one "md5  path" line per file under DIR, sorted.
checksums ()
{
    (cd "$1" && find . -type f ! -path './lost+found/*' -print0 |
         sort -z | xargs -0 -r md5sum)
}

# Version 1 of the files, made into an ext4 image without mounting.
mkdir $tmp/v1 $tmp/v2
head -c 3M /dev/urandom > $tmp/v1/big
echo "the old contents" > $tmp/v1/small
mkdir $tmp/v1/dir
seq 1 50000 > $tmp/v1/dir/numbers
checksums $tmp/v1 > $tmp/v1.sums
truncate -s 64M $origin
mkfs.ext4 -q -F -d $tmp/v1 $origin

start_store
nbdsnap -c $store create v1
nbdsnap backup "$(nbd_uri $sock snap/v1)" --to $chain/

# Version 2: another file system written over the live volume.
head -c 2M /dev/urandom > $tmp/v2/big
echo "new" > $tmp/v2/added
checksums $tmp/v2 > $tmp/v2.sums
truncate -s 64M $tmp/v2.img
mkfs.ext4 -q -F -d $tmp/v2 $tmp/v2.img
nbdcopy -- $tmp/v2.img "$(nbd_uri $sock)"
nbdsnap -c $store create v2
nbdsnap backup "$(nbd_uri $sock snap/v2)" --since v1 --to $chain
stop_nbdkit $nbdkit_pid

start_snapstore $psock $chain
for v in v1 v2; do
    fuse_mount $tmp/fuse-$v "$(nbd_uri $psock snap/$v)"
    mkdir $tmp/mnt-$v
    mount -o loop,ro,noload $tmp/fuse-$v/nbd $tmp/mnt-$v
    cleanup_fn loop_unmount $tmp/mnt-$v
    checksums $tmp/mnt-$v > $tmp/got-$v.sums
    diff -u $tmp/$v.sums $tmp/got-$v.sums
    umount $tmp/mnt-$v
    e2fsck_out=$(e2fsck -f -n $tmp/fuse-$v/nbd 2>&1) ||
        fail "e2fsck of restore point $v failed: $e2fsck_out"
done
[ "$(cat $tmp/v1/small)" = "the old contents" ]
