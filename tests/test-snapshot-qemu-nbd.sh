#!/usr/bin/env bash
# nbdkit-snapshot
# A qcow2 origin through qemu-nbd and nbdkit's nbd plugin.
#
# The filter holds a connection to the origin of its own for the life
# of the server, and the nbd plugin opens one more per client unless
# shared=true, so qemu-nbd must take more than one client:
#
# 1. qemu-nbd --shared=0 (any number of clients), nbd plugin default:
#    snapshots work, and the qcow2 is frozen once one exists (row), or
#    written in place while the snapshot reads as it was (cbw).
# 2. qemu-nbd default (--shared=1), nbd plugin shared=true: the same.
# 3. qemu-nbd default (--shared=1), nbd plugin default (shared=false):
#    the second connection to qemu-nbd would wait forever, so nbdkit
#    must refuse to start and say why ("shared"), not leave its first
#    client hanging.

source ./functions.sh
set -e
set -x

requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires nbdkit nbd --version

# A 64M qcow2 with some data in it, and what it reads as, raw.
qemu-img create -f qcow2 $tmp/vm.qcow2 64M
qemu-io -f qcow2 \
        -c 'write -P 0x11 0 1M' \
        -c 'write -P 0x22 5M 64K' \
        -c 'write -P 0x33 10485000 70000' \
        -c 'write -z 20M 1M' \
        -c 'write -P 0x44 63M 1M' \
        $tmp/vm.qcow2
qemu-img convert -f qcow2 -O raw $tmp/vm.qcow2 $tmp/before.raw
before_md5=$(md5 $tmp/before.raw)

# Cleanup hook: kill PID (with SIGKILL: a hung process must go too)
# and reap it.
kill_hard ()
{
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# start_qemu_nbd SOCKET QEMU-NBD-OPTION... IMAGE
#
# Start qemu-nbd -t on SOCKET and wait until it takes a client.
# Sets qemu_pid.
start_qemu_nbd ()
{
    local qsock="$1"
    shift
    qemu-nbd -t -k "$qsock" -f qcow2 "$@" 2>> $tmp/qemu-nbd.log &
    qemu_pid=$!
    cleanup_fn kill_hard $qemu_pid
    wait_for test -S "$qsock"
    wait_for nbdinfo --can connect "$(nbd_uri "$qsock")"
}

# stop_qemu_nbd PID: stop qemu-nbd and wait for it.
stop_qemu_nbd ()
{
    kill -TERM "$1"
    wait "$1" || true
}

# recipe N QEMU-NBD-OPTIONS NBD-PLUGIN-PARAMETERS
#
# Serve a fresh copy of the qcow2 through qemu-nbd and nbdkit with the
# filter; take a snapshot, write through the live volume, and check
# that the snapshot reads as the qcow2 did, the live volume reads the
# new data, and the qcow2 itself was not written (row) or holds the new
# data (cbw).
recipe ()
{
    local n="$1" qopts="$2" popts="$3"
    local img=$tmp/vm$n.qcow2 qsock=$tmp/q$n.sock store=$tmp/store$n
    local sock=$tmp/nbd$n.sock qemu

    cp $tmp/vm.qcow2 $img
    start_qemu_nbd $qsock $qopts $img
    qemu=$qemu_pid
    start_nbdkit -P $tmp/nbdkit$n.pid -U $sock \
                 --filter=$FILTER nbd socket=$qsock $popts \
                 snapshot-store=$store

    [ "$(export_md5 $sock)" = "$before_md5" ] ||
        fail "recipe $n: the live volume does not read as the qcow2"
    nbdsnap -c $store create s1

    cp $tmp/before.raw $tmp/expect$n.raw
    REF=$tmp/expect$n.raw nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" \
        -c 'w(pat(0x55, 65536), 0)' \
        -c 'w(pat(0xaa, 4096), 5 * 1024 * 1024 + 512)' \
        -c 'z(1024 * 1024, 30 * 1024 * 1024)' \
        -c 'w(pat(0x66, 2 * 1024 * 1024), 62 * 1024 * 1024)' \
        -c 'check(0, 8 * 1024 * 1024)'

    [ "$(export_md5 $sock snap/s1)" = "$before_md5" ] ||
        fail "recipe $n: snap/s1 does not read as the qcow2 did"
    [ "$(export_md5 $sock)" = "$(md5 $tmp/expect$n.raw)" ] ||
        fail "recipe $n: the live volume does not read the new data"
    if [ "$(md5 $tmp/expect$n.raw)" = "$before_md5" ]; then
        fail "recipe $n: the writes changed nothing (test bug)"
    fi

    stop_nbdkit $nbdkit_pid
    stop_qemu_nbd $qemu

    # Redirect-on-write: the qcow2 was frozen at the snapshot.
    # Copy-before-write: the writes went to it in place.
    qemu-img convert -f qcow2 -O raw $img $tmp/after$n.raw
    if is_cbw; then
        cmp $tmp/after$n.raw $tmp/expect$n.raw ||
            fail "recipe $n: the qcow2 does not hold what was written"
    else
        [ "$(md5 $tmp/after$n.raw)" = "$before_md5" ] ||
            fail "recipe $n: the qcow2 was written after the snapshot"
    fi
    rm -f $tmp/after$n.raw $tmp/expect$n.raw
}

# 1. qemu-nbd takes any number of clients.
recipe 1 "--shared=0" ""

# 2. One connection to qemu-nbd, shared by the nbd plugin.
recipe 2 "" "shared=true"

# 3. The trap: qemu-nbd takes one client at a time and the nbd plugin
# opens one connection per client.  nbdkit must exit at start-up with
# an error that says "shared" (after probing the origin for a second
# connection; the debug flag makes the probe wait 2 s), not leave
# clients hanging.  Today the first client hangs: give it 10 s.
cp $tmp/vm.qcow2 $tmp/vm3.qcow2
start_qemu_nbd $tmp/q3.sock $tmp/vm3.qcow2
nbdkit -f -P $tmp/trap.pid -U $tmp/trap.sock \
       -D snapshot.origin_probe_ms=2000 \
       --filter=$FILTER nbd socket=$tmp/q3.sock \
       snapshot-store=$tmp/store3 2> $tmp/trap.err &
trap_pid=$!
cleanup_fn kill_hard $trap_pid

exited=false
served=false
for (( i = 0; i < patience; i++ )); do
    if ! kill -0 $trap_pid 2>/dev/null; then
        exited=true
        break
    fi
    if [ -S $tmp/trap.sock ]; then
        status=0
        timeout $(( 10 * slowdown )) nbdinfo --size "$(nbd_uri $tmp/trap.sock)" || status=$?
        case $status in
            0) served=true; break ;;
            124)
                cat $tmp/trap.err
                fail "qemu-nbd --shared=1 with the nbd plugin's shared=false:" \
                     "an NBD client hung for 10 s instead of nbdkit" \
                     "refusing to start" ;;
        esac
        # Refused or cut off (nbdkit going away): look again.
    fi
    sleep 0.1
done
cat $tmp/trap.err
if $exited; then
    status=0
    wait $trap_pid || status=$?
    [ $status -ne 0 ] || fail "nbdkit exited with status 0 in the trap"
    grep -F shared $tmp/trap.err ||
        fail "nbdkit's error in the trap does not say 'shared'"
elif $served; then
    # Not refused, but not hanging either: fine, if it stops cleanly.
    _stop_nbdkit $trap_pid ||
        fail "nbdkit in the trap served a client but did not stop cleanly"
else
    fail "nbdkit in the trap neither exited nor served a client in" \
         "$(( patience / 10 )) s"
fi
