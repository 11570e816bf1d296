#!/usr/bin/env bash
# nbdkit-snapshot
# qemu as the client: qemu-io writes to the live volume over an
# nbd+unix URI, qemu-img convert copies an image onto it, and
# qemu-img compare finds each snapshot equal to the copy saved when
# it was taken and the live volume equal to a reference image that
# got the same qemu-io commands.

source ./functions.sh
set -e
set -x

requires qemu-io --version
requires qemu-img --version
requires nbdcopy --version

origin=$tmp/origin.img
ref=$tmp/ref.img
store=$tmp/store
sock=$tmp/nbd.sock
live=$(nbd_uri $sock)

make_origin $origin 32M
cp $origin $ref
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store

# Run the same qemu-io commands on the live volume and on the
# reference image.
both_io ()
{
    qemu-io -f raw "$@" "$live"
    qemu-io -f raw "$@" $ref
}

# Before any snapshot.
both_io -c 'write -P 0x55 0 64K' -c 'write -P 0x56 1M 4K'
qemu-img compare -f raw -F raw $ref "$live"

name=vm.pre-upgrade_1
nbdsnap -c $store create $name
cp $ref $tmp/snap1.img

# After it: aligned, unaligned and zero writes, and a write that
# spans many blocks.
both_io -c 'write -P 0x55 1M 64K' \
        -c 'write -P 0xaa 3146240 1536' \
        -c 'write -z 2M 128K' \
        -c 'write -z 5000000 70000' \
        -c 'write -P 0x77 8M 3M'
qemu-img compare -f raw -F raw $ref "$live"
qemu-img compare -f raw -F raw $tmp/snap1.img "$(nbd_uri $sock snap/$name)"

# The comparisons are not vacuous: the views do differ.
if qemu-img compare -q -f raw -F raw $tmp/snap1.img "$live"; then
    fail "live volume still equals snapshot $name"
fi

# qemu-img sees the right size, and a read-only view.
qemu-img info --output=json -f raw "$(nbd_uri $sock snap/$name)" > $tmp/info.json
cat $tmp/info.json
grep '"virtual-size": 33554432' $tmp/info.json
if qemu-io -f raw -c 'write -P 0x99 0 512' "$(nbd_uri $sock snap/$name)"; then
    fail "qemu-io wrote to snap/$name"
fi

# qemu-img convert a whole other image onto the live volume (with
# zero detection, so it sends write-zeroes for the zero parts).
other=$tmp/other.img
truncate -s 32M $other
qemu-io -f raw -c 'write -P 0x31 0 5M' -c 'write -P 0x32 20M 1M' $other
qemu-img convert -n -f raw -O raw $other "$live"
cp $other $ref
qemu-img compare -f raw -F raw $ref "$live"

nbdsnap -c $store create s2
cp $ref $tmp/snap2.img
both_io -c 'write -P 0x41 4M 12K' -c 'write -z 0 1M' -c 'write -P 0x42 31M 1M'

qemu-img compare -f raw -F raw $ref "$live"
qemu-img compare -f raw -F raw $tmp/snap1.img "$(nbd_uri $sock snap/$name)"
qemu-img compare -f raw -F raw $tmp/snap2.img "$(nbd_uri $sock snap/s2)"

# A backup of a snapshot with qemu-img convert to qcow2 reads back
# the same.
qemu-img convert -f raw -O qcow2 "$(nbd_uri $sock snap/$name)" $tmp/backup.qcow2
qemu-img compare -f raw -F qcow2 $tmp/snap1.img $tmp/backup.qcow2

# qemu-io reads of specific ranges on each view (qemu-io exits 1
# when a pattern does not match).
qemu-io -r -f raw -c 'read -P 0x55 0 64K' -c 'read -P 0x56 1M 4K' \
        "$(nbd_uri $sock snap/$name)"
qemu-io -r -f raw -c 'read -P 0x31 1M 3M' "$(nbd_uri $sock snap/s2)"
qemu-io -r -f raw -c 'read -P 0 0 1M' -c 'read -P 0x41 4M 12K' "$live"
