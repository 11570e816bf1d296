#!/usr/bin/env bash
# nbdkit-snapshot
# qemu-img as a client of the snapstore plugin: a restore point of a
# backup chain converted to qcow2 is equal, by qemu-img compare, to the
# restore point and to the snapshot it was taken from; qemu-img info
# and map read the export.

source ./functions.sh
set -e
set -x

requires qemu-img --version
requires nbdsh --version
requires nbdcopy --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
chain=$tmp/chain
psock=$tmp/plugin.sock

make_origin $origin 24M
start_store
nbdsnap -c $store create s1
nbdsnap backup "$(nbd_uri $sock snap/s1)" --to $chain/
random_round $sock 7
nbdsnap -c $store create s2
nbdsnap backup "$(nbd_uri $sock snap/s2)" --since s1 --to $chain
save_export $sock snap/s2 $tmp/s2.img
stop_nbdkit $nbdkit_pid

start_snapstore $psock $chain
qemu-img info "$(nbd_uri $psock snap/s2)" | grep 'virtual size: 24 MiB'
qemu-img convert -f raw -O qcow2 "$(nbd_uri $psock snap/s2)" $tmp/s2.qcow2
qemu-img compare -f raw -F qcow2 "$(nbd_uri $psock snap/s2)" $tmp/s2.qcow2
qemu-img compare -f raw -F qcow2 $tmp/s2.img $tmp/s2.qcow2
# The other restore point differs.
! qemu-img compare -q -f raw -F qcow2 "$(nbd_uri $psock snap/s1)" \
    $tmp/s2.qcow2
# Zeros stay sparse: qemu-img map agrees with the zeros of the image.
qemu-img map -f raw --output=json "$(nbd_uri $psock snap/s2)" > $tmp/map.json
jq -e 'map(select(.zero)) | length > 0' $tmp/map.json
