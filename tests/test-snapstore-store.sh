#!/usr/bin/env bash
# nbdkit-snapshot
# The snapstore plugin serving a filter's store at rest, for both
# kinds (row and cbw): snapshots taken between rounds of random writes,
# a bitmap-only checkpoint among them and a snapshot deleted (merged);
# after the filter stops, every snapshot the plugin serves reads as the
# filter served it, dirty/FROM/TO has the filter's map and contents, and
# zeros claimed by base:allocation are zeros.  The base is the origin
# file the store records (origin-path), or one given with base=.
#
# A store in use is refused: while the filter serves it the plugin says
# so, and while the plugin serves it the filter cannot start on it.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
psock=$tmp/plugin.sock

for mode in row cbw; do
    rm -rf $store
    make_origin $origin 24M
    start_store -- snapshot-mode=$mode
    declare -A want=()
    nbdsnap -c $store create a
    random_round $sock 1
    nbdsnap -c $store create mark --bitmap-only
    random_round $sock 2
    nbdsnap -c $store create b
    random_round $sock 3
    nbdsnap -c $store create gone
    random_round $sock 4
    nbdsnap -c $store create c
    random_round $sock 5
    nbdsnap -c $store delete gone --wait
    for s in a b c; do want[$s]=$(export_md5 $sock snap/$s); done
    nbdinfo --map "$(nbd_uri $sock dirty/a/c)" > $tmp/filter-ac.map
    nbdinfo --map "$(nbd_uri $sock dirty/mark/b)" > $tmp/filter-mb.map
    want_ac=$(export_md5 $sock dirty/a/c)

    # While the filter holds the store, the plugin refuses it.
    snapstore_fails "the store is in use" $store
    stop_nbdkit $nbdkit_pid
    grep "^origin-path $origin\$" $store/manifest
    check_clean $store

    start_snapstore $psock $store
    for s in a b c; do
        [ "$(export_md5 $psock snap/$s)" = "${want[$s]}" ] ||
            fail "$mode: snap/$s does not read as the filter served it"
    done
    [ "$(export_md5 $psock)" = "${want[c]}" ] ||
        fail "$mode: the default export is not the newest snapshot"
    [ "$(export_md5 $psock dirty/a/c)" = "$want_ac" ] ||
        fail "$mode: dirty/a/c does not read as the filter's"
    nbdinfo --map "$(nbd_uri $psock dirty/a/c)" > $tmp/plugin.map
    diff -u $tmp/filter-ac.map $tmp/plugin.map
    nbdinfo --map "$(nbd_uri $psock dirty/mark/b)" > $tmp/plugin.map
    diff -u $tmp/filter-mb.map $tmp/plugin.map
    for s in a b c; do zero_claims_hold $psock snap/$s; done

    # Exports that do not exist, or cannot be read, say why.
    nbdinfo --list "$(nbd_uri $psock)" > $tmp/list
    ! grep -F 'snap/gone' $tmp/list
    ! grep -F 'snap/mark' $tmp/list
    ! nbdinfo "$(nbd_uri $psock snap/mark)" 2>/dev/null
    grep -F "'mark' cannot be read: it is a bitmap-only checkpoint" \
        $tmp/snapstore.log
    ! nbdinfo "$(nbd_uri $psock dirty/c/a)" 2>/dev/null
    grep -F "'a' is not newer than 'c'" $tmp/snapstore.log
    ! nbdinfo "$(nbd_uri $psock dirty/a)" 2>/dev/null
    grep -F "a store at rest has no live volume" $tmp/snapstore.log

    # While the plugin serves the store, the filter cannot open it.
    start_fails "locked by another process" $origin snapshot-store=$store
    stop_nbdkit $nbdkit_pid

    # An explicit base.
    start_snapstore $psock $store base=$origin
    [ "$(export_md5 $psock snap/b)" = "${want[b]}" ] ||
        fail "$mode: with base=, snap/b does not read as the filter's"
    stop_nbdkit $nbdkit_pid
done

# A store that does not record its origin (served by another plugin
# than file) needs base=.
rm -rf $store
make_origin $origin 8M
start_nbdkit -P $tmp/other.pid -U $psock file $origin
start_nbdkit -P $tmp/nbdkit.pid -U $sock --filter=$FILTER \
             nbd socket=$psock shared=true snapshot-store=$store
nbdsnap -c $store create only
want_only=$(export_md5 $sock snap/only)
stop_nbdkit $nbdkit_pid
! grep '^origin-path' $store/manifest
snapstore_fails "does not record where its origin is" $store
start_snapstore $tmp/p2.sock $store base="$(nbd_uri $psock)"
[ "$(export_md5 $tmp/p2.sock snap/only)" = "$want_only" ] ||
    fail "over an NBD base, snap/only does not read as the filter's"
