#!/usr/bin/env bash
# nbdkit-snapshot
# The control socket is ready when nbdkit says the server is: by the
# time nbdkit writes its -P pid file, or starts its --run command, the
# filter's control socket already accepts requests, on a fresh store
# as on an old one (a stale socket left by a crash is replaced).  And
# snapshot-control= never destroys what is at its path: a regular
# file is refused ("not a socket") and kept, and the live control
# socket of another nbdkit is refused ("in use") and keeps serving
# its own store.
#
# (nbdkit 1.32 runs the --run command, forks into the background and
# writes the pid file all before it calls the filters' .after_fork.)
#
# Every part runs, and the test fails at the end with the list of
# parts that went wrong, so one run shows them all.

source ./functions.sh
set -e
set -x

requires nbdinfo --version
requires jq --version
requires ps --version

origin=$tmp/origin.img
make_origin $origin 1M

# What went wrong, one line per part.
problems=()

# gone PID: PID has exited.  A daemonized nbdkit is not our child: it
# is reaped by whoever adopted it, perhaps late, so a zombie counts as
# gone.
gone ()
{
    local st
    st=$(ps -o stat= -p "$1") || return 0
    case "$st" in
        Z*) return 0 ;;
    esac
    return 1
}

# Cleanup hook: kill the nbdkit whose pid is in PIDFILE, if any.
kill_pidfile ()
{
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    kill -KILL "$pid" 2>/dev/null || true
}

# 1. Captive mode on a fresh store: the --run command can use the
# control socket at once.
n=50
captive_failures=0
for (( i = 0; i < n; i++ )); do
    if ! nbdkit -U - --filter=$FILTER file $origin \
         snapshot-store=$tmp/st$i \
         --run "$NBDSNAP -c $tmp/st$i list" \
         > $tmp/captive.out 2> $tmp/captive.err; then
        captive_failures=$(( captive_failures + 1 ))
        cat $tmp/captive.err
    fi
done
echo "captive: $captive_failures of $n --run commands failed"
[ $captive_failures -eq 0 ] ||
    problems+=("1. captive: nbdsnap list failed in $captive_failures of $n --run commands")

# 2. Background mode with a pid file: once nbdkit has forked and the
# pid file exists, the control socket answers.
bg_failures=0
for (( i = 0; i < n; i++ )); do
    pidfile=$tmp/bg$i.pid
    cleanup_fn kill_pidfile $pidfile
    nbdkit -P $pidfile -U $tmp/bg$i.sock --filter=$FILTER file $origin \
           snapshot-store=$tmp/sp$i 2>> $tmp/bg.err ||
        fail "nbdkit (background) exited with an error"
    # The parent exits once it has forked; the child writes the pid
    # file.
    wait_for test -s $pidfile
    pid=$(cat $pidfile)
    if ! nbdsnap -c $tmp/sp$i list > $tmp/bg.out 2> $tmp/bg.nbdsnap.err; then
        bg_failures=$(( bg_failures + 1 ))
        cat $tmp/bg.nbdsnap.err
    fi
    kill $pid
    wait_for gone $pid
done
echo "background: $bg_failures of $n nbdsnap list failed"
[ $bg_failures -eq 0 ] ||
    problems+=("2. background: nbdsnap list failed in $bg_failures of $n starts")

# 3. After a crash (kill -9) the control socket is still there; the
# next nbdkit on the store replaces it.
store=$tmp/store3
start_nbdkit -P $tmp/kill.pid -U $tmp/kill.sock \
             --filter=$FILTER file $origin snapshot-store=$store
nbdsnap -c $store list
stop_nbdkit $nbdkit_pid KILL
test -S $store/control.sock
start_nbdkit -P $tmp/kill.pid -U $tmp/kill.sock \
             --filter=$FILTER file $origin snapshot-store=$store
if ! nbdsnap -c $store --json list > $tmp/list3.json; then
    problems+=("3. after kill -9: nbdsnap list failed on the restarted nbdkit")
elif ! jq -e --arg d "$(realpath $store)" '.store == $d' $tmp/list3.json; then
    problems+=("3. after kill -9: the control socket does not answer for $store")
fi
stop_nbdkit $nbdkit_pid

# start_refused WANT ARGS...: nbdkit in the foreground with the filter
# on the file plugin and ARGS must exit with an error saying WANT (a
# fixed string) on stderr, as bad_params does in
# test-snapshot-bad-input.sh.  Return 1 with a message if not.
start_refused ()
{
    local want="$1" pid i status=0
    shift
    rm -f $tmp/bad.pid
    if [ -S $tmp/bad.sock ]; then rm -f $tmp/bad.sock; fi
    nbdkit -f -P $tmp/bad.pid -U $tmp/bad.sock --filter=$FILTER \
           file $origin "$@" 2> $tmp/err &
    pid=$!
    cleanup_fn _stop_nbdkit $pid KILL
    for (( i = 0; i < patience; i++ )); do
        kill -0 $pid 2>/dev/null || break
        if nbdinfo --can connect "$(nbd_uri $tmp/bad.sock)" 2>/dev/null
        then
            _stop_nbdkit $pid
            cat $tmp/err
            echo "nbdkit accepted: $*" >&2
            return 1
        fi
        sleep 0.1
    done
    wait $pid || status=$?
    cat $tmp/err
    if [ $status -eq 0 ]; then
        echo "nbdkit exited with status 0: $*" >&2
        return 1
    fi
    if ! grep -F -- "$want" $tmp/err; then
        echo "nbdkit $*: error does not say: $want" >&2
        return 1
    fi
    return 0
}

# 4. snapshot-control= naming a regular file: refused, and the file
# is kept as it was.
printf 'precious data, not a socket\n' > $tmp/notsock
notsock_md5=$(md5 $tmp/notsock)
start_refused "not a socket" \
              snapshot-store=$tmp/store4 snapshot-control=$tmp/notsock ||
    problems+=("4. snapshot-control=REGULAR-FILE was not refused with 'not a socket'")
if [ ! -f $tmp/notsock ]; then
    problems+=("4. snapshot-control=REGULAR-FILE: the file was removed")
elif [ "$(md5 $tmp/notsock)" != "$notsock_md5" ]; then
    problems+=("4. snapshot-control=REGULAR-FILE: the file was changed")
fi

# 5. snapshot-control= naming the live control socket of another
# nbdkit: refused, and that socket goes on answering for its store.
storeA=$tmp/storeA
start_nbdkit -P $tmp/a.pid -U $tmp/a.sock \
             --filter=$FILTER file $origin snapshot-store=$storeA \
             snapshot-control=$tmp/ctl.sock
pidA=$nbdkit_pid
nbdsnap -c $tmp/ctl.sock --json list |
    jq -e --arg d "$(realpath $storeA)" '.store == $d'
cp $origin $tmp/originB.img
origin_saved=$origin
origin=$tmp/originB.img
start_refused "in use" \
              snapshot-store=$tmp/storeB snapshot-control=$tmp/ctl.sock ||
    problems+=("5. snapshot-control=LIVE-SOCKET was not refused with 'in use'")
origin=$origin_saved
kill -0 $pidA
if ! nbdsnap -c $tmp/ctl.sock --json list > $tmp/list5.json; then
    problems+=("5. the first nbdkit's control socket $tmp/ctl.sock no longer answers")
elif ! jq -e --arg d "$(realpath $storeA)" '.store == $d' $tmp/list5.json
then
    problems+=("5. $tmp/ctl.sock answers for $(jq -r .store $tmp/list5.json), not $storeA")
fi
stop_nbdkit $pidA

if [ ${#problems[@]} -gt 0 ]; then
    printf '%s\n' "${problems[@]}" >&2
    fail "${#problems[@]} part(s) failed"
fi
