#!/usr/bin/env bash
# nbdkit-snapshot
# make install (into a scratch DESTDIR) puts the filter and the plugin
# in nbdkit's directories, nbdsnap in bindir, the man pages in mandir
# and nbdsnap's bash completion where bash-completion looks; and what
# is installed works: nbdkit runs the installed filter and plugin, man
# renders the installed pages, bash -n accepts the completion.

source ./functions.sh
set -e
set -x

requires nbdinfo --version
requires man --version
requires make --version
# dir VAR: the installation directory VAR as the build's make
# expands it (${prefix}/bin and the like made absolute).
dir ()
{
    echo "print: ; @echo \$($1)" |
        env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
            make -s -C "$abs_top_builddir" -f Makefile -f - print
}
[ "$(dir POD2MAN)" != no ] ||
    skip "pod2man was not found by configure: no man pages"

# make from inside make check: the outer make's jobserver is not ours.
root=$tmp/root
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
    make -s -C "$abs_top_builddir" install DESTDIR="$root" \
    > $tmp/install.log 2>&1 || { cat $tmp/install.log; fail "make install"; }
find $root -type f -o -type l | sort

filter=$root$(dir filterdir)/nbdkit-snapshot-filter.so
plugin=$root$(dir plugindir)/nbdkit-snapstore-plugin.so
bin=$root$(dir bindir)/nbdsnap
man1=$root$(dir mandir)/man1
comp=$root$(dir bashcompdir)/nbdsnap

for f in "$filter" "$plugin" "$bin" "$comp" \
         $man1/nbdkit-snapshot-filter.1 $man1/nbdkit-snapstore-plugin.1 \
         $man1/nbdsnap.1; do
    [ -f "$f" ] || fail "not installed: $f"
done
[ -x "$bin" ] || fail "$bin is not executable"
# libtool's archives are not installed next to nbdkit's own modules.
if ls $root$(dir filterdir)/*.la \
      $root$(dir plugindir)/*.la 2>/dev/null; then
    fail "libtool archives installed"
fi
# Without --with-filterdir, the filter goes where nbdkit looks.
if ! grep -q -- '--with-filterdir' "$abs_top_builddir/config.log"; then
    [ "$(dir filterdir)" = "$(pkg-config nbdkit --variable=filterdir)" ] ||
        fail "filterdir is not nbdkit's"
    [ "$(dir plugindir)" = "$(pkg-config nbdkit --variable=plugindir)" ] ||
        fail "plugindir is not nbdkit's"
fi

# The installed filter serves a volume and takes a snapshot.
origin=$tmp/disk.img
make_origin $origin 8M
nbdkit -U - --filter="$filter" file $origin snapshot-store=$tmp/disk.snap \
       snapshot-create=first --run 'nbdinfo --list "$uri"' > $tmp/list
cat $tmp/list
grep -F 'export="snap/first"' $tmp/list
"$bin" --json check $tmp/disk.snap | jq -e .clean

# The installed plugin: --dump-plugin, and it serves the store.
nbdkit "$plugin" --dump-plugin > $tmp/dump
grep -Fx 'name=snapstore' $tmp/dump
nbdkit -U - "$plugin" $tmp/disk.snap --run \
       'nbdcopy "nbd+unix:///snap/first?socket=$unixsocket" '$tmp/first.img
cmp $origin $tmp/first.img

# The installed nbdsnap.
"$bin" --version | grep -E '^nbdsnap [0-9]'

# The installed man pages render, by path and through MANPATH.
for page in nbdkit-snapshot-filter nbdkit-snapstore-plugin nbdsnap; do
    MANWIDTH=80 man -l $man1/$page.1 2>$tmp/man.err | col -b > $tmp/man.txt
    if grep -v '^$' $tmp/man.err; then fail "man -l $page.1: warnings"; fi
    grep -F NAME $tmp/man.txt
    grep -E "^ +$page - " $tmp/man.txt ||
        fail "man -l $page.1: no NAME line"
done
MANPATH=$root$(dir mandir) MANWIDTH=80 \
    man nbdkit-snapshot-filter | col -b | grep -F 'snapshot-store'

# The installed completion parses.
bash -n "$comp"
cmp "$comp" "$abs_top_srcdir/tools/nbdsnap/nbdsnap.bash-completion"

echo "$0: ok"
