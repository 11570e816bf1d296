#!/usr/bin/env bash
# nbdkit-snapshot
# A layer allocates the rest of a block when a second page of it is
# written (filters/snapshot/view.c, top_preallocate), and never
# before: a single 4K write into a fresh 64K block takes 4K of disk,
# and so do rewrites of that page; a second page takes the whole
# block.  A second page in a block of a 1 MiB region that already
# holds 8 pages takes the whole region, once; in a sparser region it
# takes the block only.  With 2M blocks the unit allocated is 64K, and
# with 4K blocks nothing is allocated ahead.  The pages written before
# and after the allocation are on disk as written (read back from the
# layer file with O_DIRECT after a flush), the view equals a reference
# image changed the same way, and it still does after a restart.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires stat --version
requires dd --version
requires fallocate --version

# Only meaningful where the file system can allocate ahead.
fallocate -l 64K $tmp/probe 2>/dev/null ||
    skip "$tmp: no fallocate on this file system"
rm -f $tmp/probe

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
REF=$tmp/ref.img
export REF
B=65536
M=1048576

make_origin $origin 4M
cp $origin $REF
start ()
{
    start_nbdkit -P $tmp/nbdkit.pid -U $sock \
                 --filter=$FILTER file $origin \
                 snapshot-store=$store snapshot-block-size=64K
}
start
nbdsnap -c $store create s1
layer=$(ls $store/layer-*.data)
[ "$(echo "$layer" | wc -l)" -eq 1 ]

# Bytes of disk the layer holds.
allocated () { echo $(( $(stat -c '%b * %B' $layer) )); }

run () { nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c "$1"; }

# One 4K write into each of blocks 3 and 9: a page each, no more.
run "
w(bytes(range(256)) * 16, 3 * $B)
w(b'\xa5' * 4096, 9 * $B + 5 * 4096)
h.flush()
check(0, h.get_size())
"
one=$(allocated)
[ "$one" -ge 8192 ]
[ "$one" -lt $B ]

# Rewriting the one page a block holds, in part, allocates nothing.
run "
for i in range(4):
    w(bytes([0x40 + i]) * 512, 3 * $B + 1024 * i + 1)
h.flush()
check(0, h.get_size())
"
[ "$(allocated)" -eq "$one" ]

# A second page of block 9, written in part (read-modify-write from
# the origin): now block 9 is allocated whole, and only block 9 (its
# region, the first MiB, holds two pages: not dense).
run "
w(b'\x5a' * 700, 9 * $B + 11 * 4096 + 100)
h.flush()
check(0, h.get_size())
"
two=$(allocated)
[ "$two" -ge $(( one + B - 4096 )) ]
# ... and nothing else (slack for an extent tree block).
[ "$two" -le $(( one + B + 16384 )) ]

# The rest of block 9 fills in without allocating more.
run "
aw([(bytes([i]) * 4096, 9 * $B + i * 4096) for i in (0, 1, 2, 3, 4, 6, 7)])
w(b'\x3c' * 100, 9 * $B + 15 * 4096 + 3)
h.flush()
check(0, h.get_size())
"
[ "$(allocated)" -le $(( two + 16384 )) ]
filled=$(allocated)

# The region at 3 MiB: one page in each of eight of its blocks takes
# eight pages of disk ...
run "
for i in range(8):
    w(bytes([0x60 + i]) * 4096, 3 * $M + i * $B + 4096)
h.flush()
check(0, h.get_size())
"
three=$(allocated)
[ "$three" -ge $(( filled + 8 * 4096 )) ]
[ "$three" -lt $(( filled + B )) ]
# ... and a second page in one of them (a ninth page in a region
# holding eight) takes the whole region.
run "
w(b'\x77' * 4096, 3 * $M + 2 * $B + 8 * 4096)
h.flush()
check(0, h.get_size())
"
four=$(allocated)
[ "$four" -ge $(( three + M - 9 * 4096 )) ]
[ "$four" -le $(( three + M + 16384 )) ]
# The rest of the region fills in without allocating more: pages of
# the blocks that had none, second pages of those that had one.
run "
aw([(bytes([0x80 + i]) * 4096, 3 * $M + i * $B + 12 * 4096)
    for i in range(16)])
h.flush()
check(0, h.get_size())
"
[ "$(allocated)" -le $(( four + 16384 )) ]

# On disk, the layer holds each page as the view reads it: the page
# written before the allocation (5), the page written after it (11),
# and the others.
for page in 0 1 2 3 4 5 6 7 11 15; do
    off=$(( 9 * B + page * 4096 ))
    cmp <(dd if=$layer iflag=direct,skip_bytes bs=4096 skip=$off count=1 \
              status=none) \
        <(dd if=$REF iflag=skip_bytes bs=4096 skip=$off count=1 status=none)
done
for off in $(( 3 * B )) $(( 3 * M + 4096 )) $(( 3 * M + 7 * B + 4096 )) \
           $(( 3 * M + 2 * B + 8 * 4096 )) $(( 3 * M + 15 * B + 12 * 4096 ))
do
    cmp <(dd if=$layer iflag=direct,skip_bytes bs=4096 skip=$off count=1 \
              status=none) \
        <(dd if=$REF iflag=skip_bytes bs=4096 skip=$off count=1 status=none)
done

# The pages of block 9 never written read from the origin.
run "check(9 * $B, $B)"
[ "$(export_md5 $sock)" = "$(md5 $REF)" ]
[ "$(export_md5 $sock snap/s1)" = "$(md5 $origin)" ]

# After a restart, the same.
stop_nbdkit $nbdkit_pid
start
[ "$(export_md5 $sock)" = "$(md5 $REF)" ]
[ "$(export_md5 $sock snap/s1)" = "$(md5 $origin)" ]
stop_nbdkit $nbdkit_pid

# Other block sizes: two pages 20K apart in a fresh 64K-aligned range.
for bs in 2M 4K; do
    case $bs in 2M) want=65536 ;; 4K) want=8192 ;; esac
    rm -rf $store $REF
    cp $origin $REF
    start_nbdkit -P $tmp/nbdkit-$bs.pid -U $sock \
                 --filter=$FILTER file $origin \
                 snapshot-store=$store snapshot-block-size=$bs
    nbdsnap -c $store create s1
    layer=$(ls $store/layer-*.data)
    run "
w(b'\\x11' * 4096, 40 * 65536 + 4096)
w(b'\\x22' * 1000, 40 * 65536 + 6 * 4096 + 10)
h.flush()
check(0, h.get_size())
"
    [ "$(allocated)" -ge $want ]
    [ "$(allocated)" -le $(( want + 16384 )) ]
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ]
    stop_nbdkit $nbdkit_pid
done
