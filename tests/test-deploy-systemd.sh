#!/usr/bin/env bash
# nbdkit-snapshot
# docs/deploy.md's systemd recipe: contrib/systemd's template units,
# one nbdkit per volume, started by its socket.  systemd-socket-activate
# plays systemd: it listens on the socket unit's kind of socket and runs
# the service unit's ExecStart command line, word for word (with the
# instance, the conf file's ORIGIN and STORE, and the paths of this
# test filled in).  Clients reach the volume through the socket, nbdsnap
# takes a snapshot through the control socket, and a second start (a
# restart of the unit) serves the same snapshot; checked by checksum.

source ./functions.sh
set -e
set -x

requires systemd-socket-activate --version
requires nbdinfo --version
requires nbdcopy --version
requires nbdsh --version

units="$abs_top_srcdir/contrib/systemd"
service="$units/nbdkit-snapshot@.service"
socket="$units/nbdkit-snapshot@.socket"
grep -Fx 'ListenStream=/run/nbdkit-snapshot/%i.sock' "$socket"
grep -Fx 'EnvironmentFile=/etc/nbdkit-snapshot/%i.conf' "$service"

# The volume "vol1" and its conf file.
vol=vol1
ORIGIN=$tmp/$vol.img
STORE=$tmp/lib/$vol
# StateDirectory=nbdkit-snapshot: the stores' parent exists.
grep -Fx 'StateDirectory=nbdkit-snapshot' "$service"
mkdir $tmp/lib
make_origin $ORIGIN 16M
cp $ORIGIN $tmp/s1.img

# activate: run ExecStart under systemd-socket-activate on $tmp/$vol.sock.
# Sets nbdkit_pid.
activate ()
{
    local line i
    local -a cmd
    line="$(sed -n 's/^ExecStart=//p' "$service")"
    [ -n "$line" ] || fail "no ExecStart in $service"
    line="${line//%i/$vol}"
    line="${line//\$\{ORIGIN\}/$ORIGIN}"
    line="${line//\$\{STORE\}/$STORE}"
    line="${line//\/run\/nbdkit-snapshot\/$vol/$tmp/run}"
    line="${line//--filter=snapshot /--filter=$FILTER }"
    read -r -a cmd <<< "$line"
    [ "${cmd[0]}" = /usr/bin/nbdkit ] || fail "ExecStart runs ${cmd[0]}"
    cmd[0]=nbdkit
    mkdir -p $tmp/run
    rm -f $tmp/run/nbdkit.pid
    if [ -S $tmp/$vol.sock ]; then rm -f $tmp/$vol.sock; fi
    # systemd-socket-activate listens, and on the first connection
    # execs the command: $! is nbdkit then.
    systemd-socket-activate -l $tmp/$vol.sock -- "${cmd[@]}" \
        >> $tmp/nbdkit.log 2>&1 &
    nbdkit_pid=$!
    cleanup_fn _cleanup_nbdkit $nbdkit_pid
    for (( i = 0; i < 600; i++ )); do
        kill -0 $nbdkit_pid 2>/dev/null || fail "socket activation failed"
        [ -S $tmp/$vol.sock ] && break
        sleep 0.1
    done
    [ -S $tmp/$vol.sock ] || fail "no socket $tmp/$vol.sock"
    [ ! -e $tmp/run/nbdkit.pid ] || fail "nbdkit ran before a connection"
    # The first connection starts nbdkit, which answers it.
    nbdinfo --can connect "$(nbd_uri $tmp/$vol.sock)"
    [ -s $tmp/run/nbdkit.pid ] || fail "nbdkit wrote no pid file"
    [ "$(cat $tmp/run/nbdkit.pid)" = "$nbdkit_pid" ] ||
        fail "the pid file does not hold nbdkit's pid"
}

activate
sock=$tmp/$vol.sock
# nbdkit serves the socket it was passed: its own -U was not given.
nbdinfo "$(nbd_uri $sock)" | grep -F 'export-size: 16777216'
[ "$(export_md5 $sock)" = "$(md5 $ORIGIN)" ]

# A snapshot through the control socket, then writes.
nbdsnap -c $STORE create s1
REF=$tmp/live.img
cp $ORIGIN $REF
REF=$REF nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" \
    -c 'w(pat(0x33, 100000), 3 << 20)' -c 'z(1 << 20, 8 << 20)' -c 'h.flush()'
verify_views $sock $REF s1

# Stopped as systemd stops it (SIGTERM), started again: the same views.
stop_nbdkit $nbdkit_pid
activate
verify_views $sock $REF s1
nbdsnap -c $STORE list | grep -F s1
stop_nbdkit $nbdkit_pid

echo "$0: ok"
