#!/usr/bin/env bash
# nbdsnap: command-line behaviour that needs no server: help, version,
# misuse, choice of control socket, client-side name checks and
# connection errors.  Every check asserts the exact exit code, and the
# message text on the right stream with the other stream empty.

source "$abs_top_builddir/tests/functions.sh"
set -e
set -x

# --help: usage on stdout, exit 0.
expect_exit 0 nbdsnap --help
grep -F 'Usage:' "$out"
grep -E '^  list ' "$out"
grep -E '^  info NAME ' "$out"
grep -E '^  create NAME ' "$out"
grep -F -- '--json' "$out"
grep -F 'nbdsnap(1)' "$out"
test ! -s "$err"

# -V and --version.
for opt in -V --version; do
    expect_exit 0 nbdsnap $opt
    grep -Ex 'nbdsnap [0-9]+\.[0-9]+\.[0-9]+.*' "$out"
    test "$(wc -l < "$out")" -eq 1
    test ! -s "$err"
done

# Hidden options for bash completion.
expect_exit 0 nbdsnap --long-options
grep -Fx -- '--control' "$out"
grep -Fx -- '--json' "$out"
grep -Fx -- '--help' "$out"
grep -Fx -- '--version' "$out"
expect_exit 0 nbdsnap --short-options
grep -Fx -- '-c' "$out"
grep -Fx -- '-V' "$out"

# Misuse: a message and the usage on stderr, exit 1, stdout empty.
expect_exit 1 nbdsnap --bogus
grep -Fx "nbdsnap: unrecognized option '--bogus'" "$err"
grep -F 'Usage:' "$err"
test ! -s "$out"

expect_exit 1 nbdsnap -x list
grep -F "nbdsnap: invalid option -- 'x'" "$err"
test ! -s "$out"

expect_exit 1 nbdsnap list -c
grep -F "nbdsnap: option requires an argument -- 'c'" "$err"
test ! -s "$out"

expect_exit 1 nbdsnap
grep -Fx 'nbdsnap: no command given' "$err"
grep -F 'Usage:' "$err"
test ! -s "$out"

expect_exit 1 nbdsnap -c "$tmp/x.sock" frobnicate
grep -Fx "nbdsnap: unknown command 'frobnicate'" "$err"
test ! -s "$out"

expect_exit 1 nbdsnap -c "$tmp/x.sock" list extra
grep -Fx "nbdsnap: list: unexpected operand 'extra'" "$err"
test ! -s "$out"

expect_exit 1 nbdsnap -c "$tmp/x.sock" info
grep -Fx 'nbdsnap: info: missing NAME' "$err"
test ! -s "$out"

expect_exit 1 nbdsnap -c "$tmp/x.sock" create a b
grep -Fx "nbdsnap: create: unexpected operand 'b'" "$err"
test ! -s "$out"

# No control socket given anywhere.
msg='nbdsnap: no control socket: use -c SOCKET or -c STORE-DIR'
for cmd in list "info s1" "create s1"; do
    expect_exit 1 nbdsnap $cmd
    expect_error_line "$msg"
    expect_exit 1 nbdsnap --json $cmd
    expect_error_line "$msg"
done
NBDSNAP_CONTROL= expect_exit 1 nbdsnap list
expect_error_line "$msg"

dotdash="name must not start with '.' or '-'"

# Invalid names are refused before any socket is looked at: with no
# socket, and with one that does not exist, the message is the same.
long65="$(printf 'x%.0s' $(seq 65))"
long64="$(printf 'x%.0s' $(seq 64))"
for cmd in create info; do
    for sock in "" "$tmp/nope.sock"; do
        c=()
        if [ -n "$sock" ]; then c=(-c "$sock"); fi
        expect_exit 1 nbdsnap "${c[@]}" $cmd .hidden
        expect_error_line "nbdsnap: $cmd: invalid name '.hidden': $dotdash"
        expect_exit 1 nbdsnap "${c[@]}" $cmd -- -opt
        expect_error_line "nbdsnap: $cmd: invalid name '-opt': $dotdash"
        expect_exit 1 nbdsnap "${c[@]}" $cmd ''
        expect_error_line "nbdsnap: $cmd: invalid name '': name is empty"
        for name in a/b ../x 'sp ace' 'caf'$'\xc3\xa9' "$long65"; do
            expect_exit 1 nbdsnap "${c[@]}" $cmd "$name"
            grep -E "^nbdsnap: $cmd: invalid name '.*': .+\$" "$err"
            grep -F "'$name'" "$err"
            test "$(wc -l < "$err")" -eq 1
            test ! -s "$out"
        done
    done
done

enoent="connect: No such file or directory"

# Valid names get as far as connecting (64 characters is the limit).
for name in "$long64" a.b_c-D9 s1; do
    expect_exit 1 nbdsnap -c "$tmp/nope.sock" create "$name"
    expect_error_line "nbdsnap: $tmp/nope.sock: $enoent"
done

# A socket path that does not exist.
expect_exit 1 nbdsnap -c "$tmp/nope.sock" list
expect_error_line "nbdsnap: $tmp/nope.sock: $enoent"
expect_exit 1 nbdsnap --control="$tmp/nope.sock" --json info s1
expect_error_line "nbdsnap: $tmp/nope.sock: $enoent"

# Options may follow the command.
expect_exit 1 nbdsnap list --json -c "$tmp/after.sock"
expect_error_line "nbdsnap: $tmp/after.sock: $enoent"

# A store directory means DIR/control.sock, with or without a slash.
mkdir "$tmp/store"
expect_exit 1 nbdsnap -c "$tmp/store" list
expect_error_line "nbdsnap: $tmp/store/control.sock: $enoent"
expect_exit 1 nbdsnap -c "$tmp/store/" list
expect_error_line "nbdsnap: $tmp/store/control.sock: $enoent"

# $NBDSNAP_CONTROL, as a socket or a directory; -c wins over it.
NBDSNAP_CONTROL="$tmp/env.sock" expect_exit 1 nbdsnap list
expect_error_line "nbdsnap: $tmp/env.sock: $enoent"
NBDSNAP_CONTROL="$tmp/store" expect_exit 1 nbdsnap info s1
expect_error_line "nbdsnap: $tmp/store/control.sock: $enoent"
NBDSNAP_CONTROL="$tmp/env.sock" expect_exit 1 nbdsnap -c "$tmp/opt.sock" list
expect_error_line "nbdsnap: $tmp/opt.sock: $enoent"

# Something that is not a socket.
touch "$tmp/file"
expect_exit 1 nbdsnap -c "$tmp/file" list
grep -E "^nbdsnap: $tmp/file: connect: .+\$" "$err"
test ! -s "$out"

# A path too long for a Unix socket address.
long="$tmp/$(printf 'd%.0s' $(seq 120))/control.sock"
expect_exit 1 nbdsnap -c "$long" list
expect_error_line "nbdsnap: $long: connect: File name too long"

# The offline commands take a directory, not a control socket.
expect_exit 1 nbdsnap check
grep -Fx 'nbdsnap: check: missing DIR' "$err"
grep -F 'Usage: nbdsnap [--json] check DIR' "$err"
test ! -s "$out"
expect_exit 1 nbdsnap consolidate "$tmp/store"
grep -Fx 'nbdsnap: consolidate: missing DIR NAME' "$err"
expect_exit 1 nbdsnap consolidate "$tmp/store" s1 --output=x.img
grep -Fx 'nbdsnap: consolidate: --output is an option of delete only' "$err"
expect_exit 1 nbdsnap consolidate "$tmp/store" s1 --to x
grep -F 'is an option of backup only' "$err"
expect_exit 1 nbdsnap discard "$tmp/store" ../x
grep -F "nbdsnap: discard: invalid name '../x'" "$err"
expect_exit 1 nbdsnap check "$tmp/nothere"
expect_error_line "nbdsnap: check: $tmp/nothere: No such file or directory"
expect_exit 1 nbdsnap check "$tmp/file"
expect_error_line "nbdsnap: check: $tmp/file: not a directory (a store or a backup chain)"
expect_exit 1 nbdsnap check "$tmp/store"
expect_error_line "nbdsnap: check: $tmp/store: no manifest: not a store or a backup chain"
expect_exit 1 nbdsnap chain "$tmp/store"
grep -F "no manifest: not a store" "$err"
test ! -s "$out"
# Options of backup into a chain.
expect_exit 1 nbdsnap backup nbd://x --to "$tmp/file" --name a
expect_error_line "nbdsnap: backup: --name applies to a backup into a chain (--to DIR: a directory, or a path ending in '/'), and $tmp/file is a file"
expect_exit 1 nbdsnap backup nbd://x --to "$tmp/chain/" --base "$tmp/file"
expect_error_line "nbdsnap: backup: --base FILE needs --since: it starts a chain over FILE, the full backup of that checkpoint"
expect_exit 1 nbdsnap backup 'nbd://x/' --to "$tmp/chain/"
grep -F "for export '' give --name NAME" "$err"
expect_exit 1 nbdsnap list --name a
grep -F 'is an option of backup only' "$err"

echo "$0: ok"
