#!/usr/bin/env bash
# nbdsnap's bash completion (nbdsnap.bash-completion), loaded the way
# bash-completion loads it, with bash-completion's own helpers:
# commands, options per command, checkpoint names from a running
# filter's control socket, job ids, restore points of a stopped store,
# values of --strategy, file names for --to.

source "$abs_top_builddir/tests/functions.sh"
set -e
set -x

script="$abs_top_srcdir/tools/nbdsnap/nbdsnap.bash-completion"
bash -n "$script"

bc=/usr/share/bash-completion/bash_completion
[ -r "$bc" ] || skip "$bc not found (Debian package bash-completion)"
requires nbdinfo --version
requires jq --version

# bash_completion expects an interactive shell's settings; its own
# code is not under test, so no trace and no -e while loading it.
set +ex
source "$bc"
source "$script"
set -ex
complete -p nbdsnap | grep -F -- '-F _nbdsnap'

# complete WORD...: complete the last WORD of "WORD..." (it may be
# empty) and leave the sorted candidates, one a line, in $tmp/got.
# (bash-completion's helpers expect no -e, as in an interactive shell.)
complete_line ()
{
    COMP_WORDS=("$@")
    COMP_CWORD=$(( $# - 1 ))
    COMP_LINE="$*"
    COMP_POINT=${#COMP_LINE}
    COMPREPLY=()
    { set +ex; } 2>/dev/null
    _nbdsnap nbdsnap "${COMP_WORDS[COMP_CWORD]}" \
             "${COMP_WORDS[COMP_CWORD-1]}"
    set -ex
    printf '%s\n' "${COMPREPLY[@]}" | sort > $tmp/got
    cat $tmp/got
}

# expect_words WORD...: the candidates are exactly WORD...
expect_words ()
{
    printf '%s\n' "$@" | sort > $tmp/want
    diff -u $tmp/want $tmp/got || fail "completion: unexpected candidates"
}

# Commands, and options anywhere.
complete_line nbdsnap del
expect_words delete
complete_line nbdsnap c
expect_words cancel chain check consolidate create
complete_line nbdsnap -c /x --json ''
grep -Fx list $tmp/got
grep -Fx backup $tmp/got
[ "$(wc -l < $tmp/got)" -eq 13 ] || fail "expected the 13 commands"
complete_line nbdsnap --js
expect_words --json

# Each command's options, and none of another's.
complete_line nbdsnap backup --
grep -Fx -- --to $tmp/got
grep -Fx -- --since $tmp/got
grep -Fx -- --json $tmp/got
if grep -Fx -- --keep-bitmap $tmp/got; then
    fail "backup is offered delete's --keep-bitmap"
fi
complete_line nbdsnap delete s1 --k
expect_words --keep-bitmap
complete_line nbdsnap create --b
expect_words --bitmap-only
complete_line nbdsnap delete s1 --strategy ''
expect_words auto commit stream
complete_line nbdsnap delete s1 --strategy=c
expect_words commit

# --to completes file names.
mkdir $tmp/files
touch $tmp/files/backup.img $tmp/files/other
complete_line nbdsnap backup nbd://x --to $tmp/files/ba
expect_words $tmp/files/backup.img

# Every option the completion offers is one nbdsnap accepts.
for cmd in list info create delete revert jobs wait cancel backup \
           chain consolidate discard check; do
    complete_line nbdsnap $cmd --
    while read -r opt; do
        nbdsnap --long-options --short-options | grep -Fx -- "$opt" ||
            fail "$cmd: the completion offers $opt, unknown to nbdsnap"
    done < $tmp/got
done

# A running filter: snapshot names come from its control socket, and
# job ids from its job list.
origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
truncate -s 4M $origin
start_store
nbdsnap -c $store create nightly
nbdsnap -c $store create --bitmap-only weekly
nbdsnap -c $store create noon

complete_line nbdsnap -c $store delete ''
expect_words nightly weekly noon
complete_line nbdsnap -c $store/control.sock info n
expect_words nightly noon
complete_line nbdsnap --control=$store revert ''
expect_words nightly weekly noon
NBDSNAP_CONTROL=$store complete_line nbdsnap revert w
expect_words weekly
# No control socket known: nothing to offer.
complete_line nbdsnap delete ''
expect_words ''
# Only the first operand is a name.
complete_line nbdsnap -c $store delete nightly ''
expect_words ''

# A job: its id.
nbdsnap -c $store delete nightly $(strategy stream) --wait
job=$(nbdsnap -c $store --json jobs | jq '.jobs[-1].id')
complete_line nbdsnap -c $store cancel ''
grep -Fx "$job" $tmp/got

# The store of a stopped server: the offline commands read its
# restore points from the directory.
stop_nbdkit $nbdkit_pid
complete_line nbdsnap check $tmp/st
expect_words $tmp/store
complete_line nbdsnap consolidate $store ''
expect_words weekly noon
complete_line nbdsnap discard $store n
expect_words noon

echo "$0: ok"
