#!/usr/bin/env bash
# nbdkit-snapshot
# A filesystem on the live volume, through nbdfuse and a loop mount:
# make files, snapshot, change and delete them, then mount the
# snapshot read-only and find the old files with their old contents.

source ./functions.sh
set -e
set -x

requires_root
requires_fuse
requires mkfs.ext4 -V
requires losetup --version
requires mountpoint --version
requires e2fsck -V

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

truncate -s 64M $origin
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store

# fuse_mount DIR URI [-r]: serve URI as DIR/nbd with nbdfuse.
fuse_mount ()
{
    local dir="$1" uri="$2" pid
    shift 2
    mkdir -p "$dir"
    rm -f "$dir.pid"
    nbdfuse "$@" -P "$dir.pid" "$dir" "$uri" &
    pid=$!
    cleanup_fn fuse_unmount "$dir" "$pid"
    wait_for test -s "$dir.pid"
    wait_for test -f "$dir/nbd"
}

# loop_mount FILE DIR OPTIONS
loop_mount ()
{
    mkdir -p "$2"
    mount -o "loop,$3" "$1" "$2"
    cleanup_fn loop_unmount "$2"
}

# checksums DIR: one "md5  path" line per file under DIR, sorted.
checksums ()
{
    (cd "$1" && find . -type f ! -path './lost+found/*' -print0 |
         sort -z | xargs -0 -r md5sum)
}

fuse_mount $tmp/live "$(nbd_uri $sock)"
mkfs.ext4 -q -F $tmp/live/nbd
loop_mount $tmp/live/nbd $tmp/mnt rw

head -c 3M /dev/urandom > $tmp/mnt/big
echo "the old contents" > $tmp/mnt/small
mkdir $tmp/mnt/dir
head -c 100000 /dev/urandom > $tmp/mnt/dir/file
seq 1 50000 > $tmp/mnt/dir/numbers
checksums $tmp/mnt > $tmp/old.sums
cat $tmp/old.sums
sync
umount $tmp/mnt

nbdsnap -c $store create before

# Change the live filesystem: overwrite, delete, add.
loop_mount $tmp/live/nbd $tmp/mnt rw
head -c 2M /dev/urandom > $tmp/mnt/big
rm $tmp/mnt/small
rm -r $tmp/mnt/dir
echo "new" > $tmp/mnt/added
checksums $tmp/mnt > $tmp/new.sums
cat $tmp/new.sums
sync
umount $tmp/mnt
fuse_unmount $tmp/live

# The snapshot has the old files, the live volume the new ones.
fuse_mount $tmp/snap "$(nbd_uri $sock snap/before)" -r
loop_mount $tmp/snap/nbd $tmp/snapmnt ro,noload
checksums $tmp/snapmnt > $tmp/snap.sums
diff -u $tmp/old.sums $tmp/snap.sums
[ "$(cat $tmp/snapmnt/small)" = "the old contents" ]
test ! -e $tmp/snapmnt/added

fuse_mount $tmp/live2 "$(nbd_uri $sock)" -r
loop_mount $tmp/live2/nbd $tmp/livemnt ro,noload
checksums $tmp/livemnt > $tmp/live.sums
diff -u $tmp/new.sums $tmp/live.sums
test ! -e $tmp/livemnt/small

# cbw: the origin file itself holds the new filesystem.  A second
# reader of it (a read-only loop mount of the file, beside nbdkit)
# finds the new files, while snap/before still has the old ones.
if is_cbw; then
    loop_mount $origin $tmp/originmnt ro,noload
    checksums $tmp/originmnt > $tmp/origin.sums
    diff -u $tmp/new.sums $tmp/origin.sums
    checksums $tmp/snapmnt > $tmp/snap2.sums
    diff -u $tmp/old.sums $tmp/snap2.sums
fi

# The snapshot's filesystem is clean.
umount $tmp/snapmnt
e2fsck_out=$(e2fsck -f -n $tmp/snap/nbd 2>&1) ||
    fail "e2fsck of the snapshot failed: $e2fsck_out"
