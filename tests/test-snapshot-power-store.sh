#!/usr/bin/env bash
# nbdkit-snapshot
# A new store, and a new backup chain, survive a power loss.  On
# powerfs (tests/powerfs), where a name is durable only once its
# directory is fsynced: the store directory is made by the filter's
# first start, snapshot s1 is taken, then the power goes (kill -9 and
# every unsynced write dropped).  The restart finds the store with s1
# in it, not a new empty store.  Likewise the directory of a backup
# chain that nbdsnap backup made.

source ./functions.sh
set -e
set -x

requires_powerfs

origin=$tmp/origin.img
mnt=$tmp/mnt
store=$mnt/store
sock=$tmp/nbd.sock

mount_powerfs $mnt

make_origin $origin 16M
start_store
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img
stop_nbdkit $nbdkit_pid KILL
power_loss

# The store, with s1 (a new, empty store would have no s1).
start_store
nbdsnap -c $store list | grep -w s1
save_export $sock snap/s1 $tmp/s1-after.img
cmp $tmp/s1.img $tmp/s1-after.img

# The chain, with its restore point.
nbdsnap backup "$(nbd_uri $sock snap/s1)" --to $mnt/chain/
stop_nbdkit $nbdkit_pid KILL
power_loss
check_clean $mnt/chain
