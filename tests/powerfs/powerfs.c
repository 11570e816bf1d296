/* nbdkit-snapshot tests: powerfs, a file system that loses power.
 *
 * An in-memory FUSE file system (libfuse3, low-level API) that keeps,
 * for every file, its current contents and its durable contents, and
 * for every directory its current entries and its durable entries.
 * It is strict where real file systems are often kind:
 *
 *   - fsync or fdatasync of a file makes its contents (and size)
 *     durable, and nothing else: not the entry that names the file;
 *   - fsync of a directory makes its entries durable (a create,
 *     mkdir, mknod, symlink, link, rename or unlink is lost in a
 *     crash until then);
 *   - writes to a file opened with O_SYNC or O_DSYNC are durable at
 *     once; msync (MS_SYNC) of a shared mapping reaches fsync (no
 *     direct I/O, no writeback cache: every write(2) reaches us
 *     synchronously, and mapped pages when the kernel writes them
 *     back);
 *   - syncfs and sync(2) do not reach a FUSE file system, so they
 *     make nothing durable here: a program must fsync.
 *
 * A crash is a command, not the death of this process: the caller
 * kills the programs using the mount first, then says "crash".  From
 * then on nothing becomes durable; every inode's cached pages are
 * invalidated (the kernel writes dirty mapped pages back to us first,
 * and they count as unsynced, as they were in a page cache at the
 * moment power went); then, for each page of each file that differs
 * from its durable contents, and for each directory whose entries
 * differ, a coin decides whether it had reached the disk before the
 * power went (torn writeback, at 4 KiB page granularity; within a page
 * a write is all or nothing).  Current := durable, and the file system
 * serves the state a reboot would find.
 *
 *   powerfs MOUNTPOINT
 *
 * runs in the foreground and reads commands on stdin, one a line,
 * answering each on stdout with one line:
 *
 *   crash PERCENT SEED   -> "crashed kept K dropped D dirs-kept X dirs-dropped Y"
 *       each unsynced page or directory reaches the disk with
 *       probability PERCENT/100 (0: strictly the synced state);
 *       SEED seeds the coins (the same state, the same outcome);
 *   sync                 -> "synced" (everything durable)
 *   stats                -> "inodes N pages P"
 *
 * "ready" is printed once the file system is mounted.  At EOF on stdin
 * it unmounts itself (lazily) and exits.
 */

#define FUSE_USE_VERSION 34

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

#define PAGE 4096

/* One page of file data, shared between the current and the durable
 * contents (and between files' versions) until written: copy on write.
 */
struct page {
  unsigned ref;
  unsigned char d[PAGE];
};

struct data {
  struct page **pages;          /* NULL: a hole, reads as zeros */
  size_t npages;                /* allocated slots */
  uint64_t size;
};

struct dent {
  char *name;
  fuse_ino_t ino;
};

struct dir {
  struct dent *e;
  size_t n, cap;
};

struct inode {
  fuse_ino_t ino;
  mode_t mode;
  dev_t rdev;
  struct timespec mtime, ctime, atime;
  struct data cur, dur;         /* regular files */
  struct dir dcur, ddur;        /* directories */
  fuse_ino_t parent;            /* directories: for ".." */
  char *target;                 /* symbolic links */
  uint64_t nlookup;             /* the kernel's references */
  unsigned nopen;
  unsigned cur_links, dur_links;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct inode **inodes;   /* by number; NULL once freed */
static size_t ninodes;          /* numbers handed out, + 1 */
static bool crashing;           /* nothing becomes durable */
static struct fuse_session *se;
static char *mountpoint;

/* ---- helpers ---- */

static void *
xcalloc (size_t n, size_t s)
{
  void *p = calloc (n, s);
  if (p == NULL) {
    perror ("calloc");
    abort ();
  }
  return p;
}

static void
page_put (struct page *p)
{
  if (p && --p->ref == 0)
    free (p);
}

static void
data_free (struct data *d)
{
  for (size_t i = 0; i < d->npages; ++i)
    page_put (d->pages[i]);
  free (d->pages);
  d->pages = NULL;
  d->npages = 0;
  d->size = 0;
}

/* dst := src, sharing the pages. */
static void
data_copy (struct data *dst, const struct data *src)
{
  struct data n = { NULL, src->npages, src->size };
  if (src->npages) {
    n.pages = xcalloc (src->npages, sizeof *n.pages);
    for (size_t i = 0; i < src->npages; ++i)
      if ((n.pages[i] = src->pages[i]) != NULL)
        n.pages[i]->ref++;
  }
  data_free (dst);
  *dst = n;
}

static void
data_reserve (struct data *d, size_t npages)
{
  if (npages <= d->npages)
    return;
  size_t n = d->npages ? d->npages : 16;
  while (n < npages)
    n *= 2;
  d->pages = realloc (d->pages, n * sizeof *d->pages);
  if (d->pages == NULL) {
    perror ("realloc");
    abort ();
  }
  memset (d->pages + d->npages, 0, (n - d->npages) * sizeof *d->pages);
  d->npages = n;
}

/* A page of d that may be written (allocated, not shared). */
static struct page *
page_mut (struct data *d, size_t i)
{
  struct page *p;

  data_reserve (d, i + 1);
  p = d->pages[i];
  if (p == NULL) {
    p = xcalloc (1, sizeof *p);
    p->ref = 1;
    d->pages[i] = p;
  }
  else if (p->ref > 1) {
    struct page *c = malloc (sizeof *c);
    if (c == NULL)
      abort ();
    memcpy (c->d, p->d, PAGE);
    c->ref = 1;
    p->ref--;
    d->pages[i] = c;
  }
  return d->pages[i];
}

/* Zero [off, off+len) of d; whole pages become holes if punch. */
static void
data_zero (struct data *d, uint64_t off, uint64_t len, bool punch)
{
  uint64_t end = off + len;

  while (off < end) {
    size_t i = off / PAGE;
    uint64_t s = off % PAGE, n = PAGE - s;
    if (n > end - off)
      n = end - off;
    if (i < d->npages && d->pages[i]) {
      if (n == PAGE && punch) {
        page_put (d->pages[i]);
        d->pages[i] = NULL;
      }
      else
        memset (page_mut (d, i)->d + s, 0, n);
    }
    else if (!punch)
      page_mut (d, i);
    off += n;
  }
}

/* Drop what lies past SIZE (always, if cut; else only when shrinking,
 * which keeps pages preallocated past the end).
 */
static void
data_resize (struct data *d, uint64_t size, bool cut)
{
  if (cut || size < d->size) {
    size_t keep = (size + PAGE - 1) / PAGE;
    for (size_t i = keep; i < d->npages; ++i) {
      page_put (d->pages[i]);
      d->pages[i] = NULL;
    }
    if (size % PAGE && size / PAGE < d->npages && d->pages[size / PAGE])
      memset (page_mut (d, size / PAGE)->d + size % PAGE, 0,
              PAGE - size % PAGE);
  }
  d->size = size;
}

static void
data_truncate (struct data *d, uint64_t size)
{
  data_resize (d, size, false);
}

static void
data_write (struct data *d, const char *buf, size_t len, uint64_t off)
{
  size_t done = 0;

  while (done < len) {
    uint64_t o = off + done;
    size_t s = o % PAGE, n = PAGE - s;
    if (n > len - done)
      n = len - done;
    memcpy (page_mut (d, o / PAGE)->d + s, buf + done, n);
    done += n;
  }
  if (off + len > d->size)
    d->size = off + len;
}

static struct inode *
get (fuse_ino_t ino)
{
  return ino < ninodes ? inodes[ino] : NULL;
}

static struct inode *
inode_new (mode_t mode)
{
  struct inode *n = xcalloc (1, sizeof *n);

  if (ninodes % 1024 == 0) {
    inodes = realloc (inodes, (ninodes + 1024) * sizeof *inodes);
    if (inodes == NULL)
      abort ();
  }
  n->ino = ninodes;
  inodes[ninodes++] = n;
  n->mode = mode;
  clock_gettime (CLOCK_REALTIME, &n->mtime);
  n->ctime = n->atime = n->mtime;
  return n;
}

static void
dir_clear (struct dir *d)
{
  for (size_t i = 0; i < d->n; ++i)
    free (d->e[i].name);
  free (d->e);
  memset (d, 0, sizeof *d);
}

static void
inode_maybe_free (struct inode *n)
{
  if (n == NULL || n->ino == FUSE_ROOT_ID || n->nopen ||
      n->cur_links || n->dur_links)
    return;
  /* No name and not open: nothing can reach the contents again, even
   * if the kernel still caches the inode (after a crash it may do so
   * until memory runs short).
   */
  data_free (&n->cur);
  data_free (&n->dur);
  dir_clear (&n->dcur);
  /* A removed directory's durable entries (unsynced unlinks in it)
   * no longer keep anything.
   */
  for (size_t i = 0; i < n->ddur.n; ++i) {
    struct inode *c = inodes[n->ddur.e[i].ino];
    if (c) {
      c->dur_links--;
      inode_maybe_free (c);
    }
  }
  dir_clear (&n->ddur);
  if (n->nlookup)
    return;
  inodes[n->ino] = NULL;
  free (n->target);
  free (n);
}

static struct dent *
dir_find (struct dir *d, const char *name)
{
  for (size_t i = 0; i < d->n; ++i)
    if (strcmp (d->e[i].name, name) == 0)
      return &d->e[i];
  return NULL;
}

static void
dir_add (struct dir *d, const char *name, fuse_ino_t ino)
{
  if (d->n == d->cap) {
    d->cap = d->cap ? d->cap * 2 : 16;
    d->e = realloc (d->e, d->cap * sizeof *d->e);
    if (d->e == NULL)
      abort ();
  }
  d->e[d->n].name = strdup (name);
  d->e[d->n++].ino = ino;
}

static void
dir_del (struct dir *d, struct dent *e)
{
  free (e->name);
  *e = d->e[--d->n];
}

/* dst := src (names copied); link counts follow (durable side). */
static void
dir_make_durable (struct inode *dn)
{
  for (size_t i = 0; i < dn->ddur.n; ++i) {
    struct inode *c = get (dn->ddur.e[i].ino);
    if (c)
      c->dur_links--;
  }
  dir_clear (&dn->ddur);
  for (size_t i = 0; i < dn->dcur.n; ++i) {
    dir_add (&dn->ddur, dn->dcur.e[i].name, dn->dcur.e[i].ino);
    struct inode *c = get (dn->dcur.e[i].ino);
    if (c)
      c->dur_links++;
  }
}

static void
touch (struct inode *n)
{
  clock_gettime (CLOCK_REALTIME, &n->mtime);
  n->ctime = n->mtime;
}

static void
fill_attr (struct inode *n, struct stat *st)
{
  memset (st, 0, sizeof *st);
  st->st_ino = n->ino;
  st->st_mode = n->mode;
  st->st_nlink = S_ISDIR (n->mode) ? 2 : n->cur_links;
  st->st_uid = getuid ();
  st->st_gid = getgid ();
  st->st_rdev = n->rdev;
  if (S_ISREG (n->mode)) {
    uint64_t held = 0;
    st->st_size = n->cur.size;
    for (size_t i = 0; i < n->cur.npages; ++i)
      held += n->cur.pages[i] != NULL;
    st->st_blocks = held * (PAGE / 512);
  }
  else if (S_ISLNK (n->mode))
    st->st_size = strlen (n->target);
  st->st_blksize = PAGE;
  st->st_mtim = n->mtime;
  st->st_ctim = n->ctime;
  st->st_atim = n->atime;
}

static void
reply_entry (fuse_req_t req, struct inode *n)
{
  struct fuse_entry_param e;

  memset (&e, 0, sizeof e);
  e.ino = n->ino;
  e.generation = 1;
  fill_attr (n, &e.attr);
  /* No caching of names or attributes: after a crash they change
   * under the kernel's feet.
   */
  e.attr_timeout = 0;
  e.entry_timeout = 0;
  n->nlookup++;
  fuse_reply_entry (req, &e);
}

/* Lock and find inode INO, or reply ESTALE and return NULL unlocked. */
static struct inode *
lock_inode (fuse_req_t req, fuse_ino_t ino)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL) {
    pthread_mutex_unlock (&lock);
    fuse_reply_err (req, ESTALE);
  }
  return n;
}

/* ---- operations ---- */

static void
op_init (void *userdata, struct fuse_conn_info *conn)
{
  (void) userdata;
  /* write(2) goes through to us at once; only mapped pages wait in
   * the kernel, and a crash invalidates (after writing back) those.
   */
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static void
op_lookup (fuse_req_t req, fuse_ino_t parent, const char *name)
{
  pthread_mutex_lock (&lock);
  struct inode *p = get (parent);
  struct dent *e = p && S_ISDIR (p->mode) ? dir_find (&p->dcur, name) : NULL;
  if (e == NULL)
    fuse_reply_err (req, p ? ENOENT : ESTALE);
  else
    reply_entry (req, get (e->ino));
  pthread_mutex_unlock (&lock);
}

static void
forget_one (fuse_ino_t ino, uint64_t nlookup)
{
  struct inode *n = get (ino);
  if (n) {
    n->nlookup -= nlookup < n->nlookup ? nlookup : n->nlookup;
    inode_maybe_free (n);
  }
}

static void
op_forget (fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
  pthread_mutex_lock (&lock);
  forget_one (ino, nlookup);
  pthread_mutex_unlock (&lock);
  fuse_reply_none (req);
}

static void
op_forget_multi (fuse_req_t req, size_t count,
                 struct fuse_forget_data *forgets)
{
  pthread_mutex_lock (&lock);
  for (size_t i = 0; i < count; ++i)
    forget_one (forgets[i].ino, forgets[i].nlookup);
  pthread_mutex_unlock (&lock);
  fuse_reply_none (req);
}

static void
op_getattr (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct stat st;
  (void) fi;

  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL)
    fuse_reply_err (req, ESTALE);
  else {
    fill_attr (n, &st);
    fuse_reply_attr (req, &st, 0);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_setattr (fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
            struct fuse_file_info *fi)
{
  struct stat st;
  (void) fi;

  struct inode *n = lock_inode (req, ino);
  if (n == NULL)
    return;
  if (to_set & FUSE_SET_ATTR_SIZE) {
    if (!S_ISREG (n->mode)) {
      fuse_reply_err (req, EINVAL);
      goto out;
    }
    data_truncate (&n->cur, attr->st_size);
    touch (n);
  }
  if (to_set & FUSE_SET_ATTR_MODE)
    n->mode = (n->mode & S_IFMT) | (attr->st_mode & 07777);
  if (to_set & FUSE_SET_ATTR_MTIME)
    n->mtime = attr->st_mtim;
  if (to_set & FUSE_SET_ATTR_MTIME_NOW)
    clock_gettime (CLOCK_REALTIME, &n->mtime);
  if (to_set & FUSE_SET_ATTR_ATIME)
    n->atime = attr->st_atim;
  if (to_set & FUSE_SET_ATTR_ATIME_NOW)
    clock_gettime (CLOCK_REALTIME, &n->atime);
  fill_attr (n, &st);
  fuse_reply_attr (req, &st, 0);
 out:
  pthread_mutex_unlock (&lock);
}

/* A new inode named NAME in PARENT (current entries only). */
static struct inode *
make_node (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
           int *err)
{
  struct inode *p = get (parent);

  if (p == NULL || !S_ISDIR (p->mode)) {
    *err = p ? ENOTDIR : ESTALE;
    return NULL;
  }
  if (dir_find (&p->dcur, name)) {
    *err = EEXIST;
    return NULL;
  }
  (void) req;
  struct inode *n = inode_new (mode);
  n->parent = parent;
  n->cur_links = 1;
  dir_add (&p->dcur, name, n->ino);
  touch (p);
  return n;
}

static void
op_mknod (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
          dev_t rdev)
{
  int err;

  pthread_mutex_lock (&lock);
  struct inode *n = make_node (req, parent, name, mode, &err);
  if (n == NULL)
    fuse_reply_err (req, err);
  else {
    n->rdev = rdev;
    reply_entry (req, n);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_mkdir (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
  int err;

  pthread_mutex_lock (&lock);
  struct inode *n = make_node (req, parent, name, S_IFDIR | (mode & 07777),
                               &err);
  if (n == NULL)
    fuse_reply_err (req, err);
  else
    reply_entry (req, n);
  pthread_mutex_unlock (&lock);
}

static void
op_symlink (fuse_req_t req, const char *link, fuse_ino_t parent,
            const char *name)
{
  int err;

  pthread_mutex_lock (&lock);
  struct inode *n = make_node (req, parent, name, S_IFLNK | 0777, &err);
  if (n == NULL)
    fuse_reply_err (req, err);
  else {
    n->target = strdup (link);
    reply_entry (req, n);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_readlink (fuse_req_t req, fuse_ino_t ino)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL || !S_ISLNK (n->mode))
    fuse_reply_err (req, n ? EINVAL : ESTALE);
  else
    fuse_reply_readlink (req, n->target);
  pthread_mutex_unlock (&lock);
}

static void
op_create (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
           struct fuse_file_info *fi)
{
  int err;
  struct fuse_entry_param e;

  pthread_mutex_lock (&lock);
  struct inode *n = make_node (req, parent, name, S_IFREG | (mode & 07777),
                               &err);
  if (n == NULL)
    fuse_reply_err (req, err);
  else {
    memset (&e, 0, sizeof e);
    e.ino = n->ino;
    e.generation = 1;
    fill_attr (n, &e.attr);
    n->nlookup++;
    n->nopen++;
    fi->direct_io = 0;
    fi->keep_cache = 0;
    fuse_reply_create (req, &e, fi);
  }
  pthread_mutex_unlock (&lock);
}

/* Drop the current entry E of directory P. */
static void
unlink_entry (struct inode *p, struct dent *e)
{
  struct inode *c = get (e->ino);
  dir_del (&p->dcur, e);
  if (c) {
    c->cur_links--;
    touch (c);
    inode_maybe_free (c);
  }
  touch (p);
}

static void
op_unlink (fuse_req_t req, fuse_ino_t parent, const char *name)
{
  pthread_mutex_lock (&lock);
  struct inode *p = get (parent);
  struct dent *e = p && S_ISDIR (p->mode) ? dir_find (&p->dcur, name) : NULL;
  if (e == NULL)
    fuse_reply_err (req, ENOENT);
  else if (S_ISDIR (get (e->ino)->mode))
    fuse_reply_err (req, EISDIR);
  else {
    unlink_entry (p, e);
    fuse_reply_err (req, 0);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_rmdir (fuse_req_t req, fuse_ino_t parent, const char *name)
{
  pthread_mutex_lock (&lock);
  struct inode *p = get (parent);
  struct dent *e = p && S_ISDIR (p->mode) ? dir_find (&p->dcur, name) : NULL;
  struct inode *c = e ? get (e->ino) : NULL;
  if (c == NULL)
    fuse_reply_err (req, ENOENT);
  else if (!S_ISDIR (c->mode))
    fuse_reply_err (req, ENOTDIR);
  else if (c->dcur.n)
    fuse_reply_err (req, ENOTEMPTY);
  else {
    unlink_entry (p, e);
    fuse_reply_err (req, 0);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_rename (fuse_req_t req, fuse_ino_t parent, const char *name,
           fuse_ino_t newparent, const char *newname, unsigned int flags)
{
  pthread_mutex_lock (&lock);
  struct inode *p = get (parent), *np = get (newparent);
  struct dent *e = p && S_ISDIR (p->mode) ? dir_find (&p->dcur, name) : NULL;
  struct dent *t;
  fuse_ino_t ino;

  if (flags & ~RENAME_NOREPLACE) {
    fuse_reply_err (req, EINVAL);
    goto out;
  }
  if (e == NULL || np == NULL || !S_ISDIR (np->mode)) {
    fuse_reply_err (req, ENOENT);
    goto out;
  }
  ino = e->ino;
  t = dir_find (&np->dcur, newname);
  if (t && t->ino == ino) {
    fuse_reply_err (req, 0);
    goto out;
  }
  if (t) {
    struct inode *tc = get (t->ino), *c = get (ino);
    if (flags & RENAME_NOREPLACE) {
      fuse_reply_err (req, EEXIST);
      goto out;
    }
    if (S_ISDIR (tc->mode) && (!S_ISDIR (c->mode) || tc->dcur.n)) {
      fuse_reply_err (req, S_ISDIR (c->mode) ? ENOTEMPTY : EISDIR);
      goto out;
    }
    if (!S_ISDIR (tc->mode) && S_ISDIR (c->mode)) {
      fuse_reply_err (req, ENOTDIR);
      goto out;
    }
    unlink_entry (np, t);
  }
  /* e may have moved if np == p: find it again. */
  e = dir_find (&p->dcur, name);
  dir_del (&p->dcur, e);
  dir_add (&np->dcur, newname, ino);
  if (S_ISDIR (get (ino)->mode))
    get (ino)->parent = newparent;
  touch (p);
  touch (np);
  fuse_reply_err (req, 0);
 out:
  pthread_mutex_unlock (&lock);
}

static void
op_link (fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
         const char *newname)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino), *np = get (newparent);
  if (n == NULL || np == NULL || !S_ISDIR (np->mode))
    fuse_reply_err (req, ENOENT);
  else if (S_ISDIR (n->mode))
    fuse_reply_err (req, EPERM);
  else if (dir_find (&np->dcur, newname))
    fuse_reply_err (req, EEXIST);
  else {
    dir_add (&np->dcur, newname, ino);
    n->cur_links++;
    touch (np);
    n->ctime = np->mtime;
    reply_entry (req, n);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_open (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL)
    fuse_reply_err (req, ESTALE);
  else {
    if ((fi->flags & O_TRUNC) && S_ISREG (n->mode))
      data_truncate (&n->cur, 0);
    n->nopen++;
    fi->direct_io = 0;
    fi->keep_cache = 0;
    fuse_reply_open (req, fi);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_read (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
         struct fuse_file_info *fi)
{
  (void) fi;
  struct inode *n = lock_inode (req, ino);
  if (n == NULL)
    return;
  if ((uint64_t) off >= n->cur.size)
    size = 0;
  else if (off + size > n->cur.size)
    size = n->cur.size - off;
  char *buf = malloc (size ? size : 1);
  if (buf == NULL) {
    fuse_reply_err (req, ENOMEM);
    goto out;
  }
  for (size_t done = 0; done < size; ) {
    uint64_t o = off + done;
    size_t i = o / PAGE, s = o % PAGE, k = PAGE - s;
    if (k > size - done)
      k = size - done;
    if (i < n->cur.npages && n->cur.pages[i])
      memcpy (buf + done, n->cur.pages[i]->d + s, k);
    else
      memset (buf + done, 0, k);
    done += k;
  }
  fuse_reply_buf (req, buf, size);
  free (buf);
 out:
  pthread_mutex_unlock (&lock);
}

static void
make_durable (struct inode *n)
{
  if (!crashing)
    data_copy (&n->dur, &n->cur);
}

static void
op_write (fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
          off_t off, struct fuse_file_info *fi)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL)
    fuse_reply_err (req, ESTALE);
  else {
    data_write (&n->cur, buf, size, off);
    touch (n);
    if (fi->flags & (O_SYNC | O_DSYNC))
      make_durable (n);
    fuse_reply_write (req, size);
  }
  pthread_mutex_unlock (&lock);
}

static void
op_flush (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  (void) ino;
  (void) fi;
  fuse_reply_err (req, 0);
}

/* A file or directory closed. */
static void
closed (fuse_req_t req, fuse_ino_t ino)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n && n->nopen) {
    n->nopen--;
    inode_maybe_free (n);
  }
  pthread_mutex_unlock (&lock);
  fuse_reply_err (req, 0);
}

static void
op_release (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  (void) fi;
  closed (req, ino);
}

/* fsync of a file (its data) or of a directory (its entries); nothing
 * becomes durable while crashing.
 */
static void
synced (fuse_req_t req, fuse_ino_t ino)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n && S_ISREG (n->mode))
    make_durable (n);
  else if (n && S_ISDIR (n->mode) && !crashing)
    dir_make_durable (n);
  pthread_mutex_unlock (&lock);
  fuse_reply_err (req, n ? 0 : ESTALE);
}

static void
op_fsync (fuse_req_t req, fuse_ino_t ino, int datasync,
          struct fuse_file_info *fi)
{
  (void) datasync;
  (void) fi;
  synced (req, ino);
}

/* A directory listing, taken at opendir. */
struct listing {
  size_t n;
  struct dent *e;
};

static void
op_opendir (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL || !S_ISDIR (n->mode)) {
    fuse_reply_err (req, n ? ENOTDIR : ESTALE);
    goto out;
  }
  struct listing *l = xcalloc (1, sizeof *l);
  l->e = xcalloc (n->dcur.n + 2, sizeof *l->e);
  l->e[0].name = strdup (".");
  l->e[0].ino = ino;
  l->e[1].name = strdup ("..");
  l->e[1].ino = n->parent ? n->parent : ino;
  for (size_t i = 0; i < n->dcur.n; ++i) {
    l->e[i + 2].name = strdup (n->dcur.e[i].name);
    l->e[i + 2].ino = n->dcur.e[i].ino;
  }
  l->n = n->dcur.n + 2;
  fi->fh = (uintptr_t) l;
  n->nopen++;
  fuse_reply_open (req, fi);
 out:
  pthread_mutex_unlock (&lock);
}

static void
op_readdir (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
            struct fuse_file_info *fi)
{
  struct listing *l = (struct listing *) (uintptr_t) fi->fh;
  char *buf = malloc (size);
  size_t used = 0;
  (void) ino;

  if (buf == NULL) {
    fuse_reply_err (req, ENOMEM);
    return;
  }
  pthread_mutex_lock (&lock);
  for (size_t i = off; i < l->n; ++i) {
    struct stat st;
    struct inode *c = get (l->e[i].ino);
    memset (&st, 0, sizeof st);
    st.st_ino = l->e[i].ino;
    st.st_mode = c ? c->mode : S_IFREG;
    size_t k = fuse_add_direntry (req, buf + used, size - used,
                                  l->e[i].name, &st, i + 1);
    if (k > size - used)
      break;
    used += k;
  }
  pthread_mutex_unlock (&lock);
  fuse_reply_buf (req, buf, used);
  free (buf);
}

static void
op_releasedir (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct listing *l = (struct listing *) (uintptr_t) fi->fh;

  for (size_t i = 0; i < l->n; ++i)
    free (l->e[i].name);
  free (l->e);
  free (l);
  closed (req, ino);
}

static void
op_fsyncdir (fuse_req_t req, fuse_ino_t ino, int datasync,
             struct fuse_file_info *fi)
{
  (void) datasync;
  (void) fi;
  synced (req, ino);
}

static void
op_statfs (fuse_req_t req, fuse_ino_t ino)
{
  struct statvfs st;
  (void) ino;

  memset (&st, 0, sizeof st);
  st.f_bsize = st.f_frsize = PAGE;
  st.f_blocks = st.f_bfree = st.f_bavail = 1 << 24;   /* 64 GiB */
  st.f_files = st.f_ffree = st.f_favail = 1 << 20;
  st.f_namemax = 255;
  fuse_reply_statfs (req, &st);
}

static void
op_fallocate (fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
              off_t len, struct fuse_file_info *fi)
{
  (void) fi;
  pthread_mutex_lock (&lock);
  struct inode *n = get (ino);
  if (n == NULL || !S_ISREG (n->mode))
    fuse_reply_err (req, n ? ENODEV : ESTALE);
  else if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE) {
    uint64_t size = n->cur.size;
    /* Allocate: holes become zero pages. */
    for (uint64_t i = off / PAGE; i < (uint64_t) (off + len + PAGE - 1) / PAGE;
         ++i)
      if (i >= n->cur.npages || n->cur.pages[i] == NULL)
        page_mut (&n->cur, i);
    n->cur.size = size;
    if (mode == 0 && (uint64_t) (off + len) > size)
      n->cur.size = off + len;
    fuse_reply_err (req, 0);
  }
  else if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) {
    uint64_t end = off + len;
    if (end > n->cur.size)
      end = n->cur.size;
    if ((uint64_t) off < end)
      data_zero (&n->cur, off, end - off, true);
    touch (n);
    fuse_reply_err (req, 0);
  }
  else if ((mode & ~FALLOC_FL_KEEP_SIZE) == FALLOC_FL_ZERO_RANGE) {
    data_zero (&n->cur, off, len, false);
    if (!(mode & FALLOC_FL_KEEP_SIZE) && (uint64_t) (off + len) > n->cur.size)
      n->cur.size = off + len;
    touch (n);
    fuse_reply_err (req, 0);
  }
  else
    fuse_reply_err (req, EOPNOTSUPP);
  pthread_mutex_unlock (&lock);
}

static void
op_lseek (fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
          struct fuse_file_info *fi)
{
  (void) fi;
  struct inode *n = lock_inode (req, ino);
  if (n == NULL)
    return;
  uint64_t size = n->cur.size, pos = off;
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    fuse_reply_err (req, EINVAL);
    goto out;
  }
  if (off < 0 || pos >= size) {
    fuse_reply_err (req, ENXIO);
    goto out;
  }
  for (;;) {
    size_t i = pos / PAGE;
    bool data = i < n->cur.npages && n->cur.pages[i] != NULL;
    if (data == (whence == SEEK_DATA))
      break;
    pos = (uint64_t) (i + 1) * PAGE;
    if (pos >= size) {
      if (whence == SEEK_DATA) {
        fuse_reply_err (req, ENXIO);
        goto out;
      }
      pos = size;
      break;
    }
  }
  fuse_reply_lseek (req, pos);
 out:
  pthread_mutex_unlock (&lock);
}

static const struct fuse_lowlevel_ops ops = {
  .init = op_init,
  .lookup = op_lookup,
  .forget = op_forget,
  .forget_multi = op_forget_multi,
  .getattr = op_getattr,
  .setattr = op_setattr,
  .readlink = op_readlink,
  .mknod = op_mknod,
  .mkdir = op_mkdir,
  .unlink = op_unlink,
  .rmdir = op_rmdir,
  .symlink = op_symlink,
  .rename = op_rename,
  .link = op_link,
  .open = op_open,
  .read = op_read,
  .write = op_write,
  .flush = op_flush,
  .release = op_release,
  .fsync = op_fsync,
  .opendir = op_opendir,
  .readdir = op_readdir,
  .releasedir = op_releasedir,
  .fsyncdir = op_fsyncdir,
  .statfs = op_statfs,
  .create = op_create,
  .fallocate = op_fallocate,
  .lseek = op_lseek,
};

/* ---- the power ---- */

/* xorshift64*, seeded by the crash command. */
static uint64_t rng_state;

static unsigned
coin (void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (rng_state * UINT64_C (2685821657736338717)) >> 33 & 0xffff;
}

static bool
reaches_disk (unsigned percent)
{
  return coin () % 100 < percent;
}

/* Ask the kernel to drop what it caches of every inode it knows (and
 * write back dirty mapped pages to us first).  Called without the
 * lock: writing back needs the session loop to take it.
 */
static void
invalidate_all (void)
{
  size_t n;
  fuse_ino_t *list;

  pthread_mutex_lock (&lock);
  n = 0;
  list = xcalloc (ninodes + 1, sizeof *list);
  for (size_t i = 1; i < ninodes; ++i)
    if (inodes[i] && inodes[i]->nlookup)
      list[n++] = i;
  pthread_mutex_unlock (&lock);
  for (size_t i = 0; i < n; ++i)
    (void) fuse_lowlevel_notify_inval_inode (se, list[i], 0, 0);
  free (list);
}

static void
crash (unsigned percent, uint64_t seed)
{
  uint64_t kept = 0, dropped = 0, dkept = 0, ddropped = 0;

  pthread_mutex_lock (&lock);
  crashing = true;
  pthread_mutex_unlock (&lock);
  invalidate_all ();

  pthread_mutex_lock (&lock);
  rng_state = seed * 2 + 1;
  for (size_t i = 1; i < ninodes; ++i) {
    struct inode *n = inodes[i];
    if (n == NULL)
      continue;
    if (S_ISREG (n->mode)) {
      struct data *c = &n->cur, *d = &n->dur;
      size_t np = (c->size > d->size ? c->size : d->size) / PAGE + 1;
      bool changed = c->size != d->size;
      data_reserve (c, np);
      data_reserve (d, np);
      for (size_t p = 0; p < np; ++p) {
        struct page *a = c->pages[p], *b = d->pages[p];
        if (a == b || (a && b && memcmp (a->d, b->d, PAGE) == 0))
          continue;
        changed = true;
        if (reaches_disk (percent)) {
          kept++;
          page_put (b);
          d->pages[p] = a;
          if (a)
            a->ref++;
        }
        else
          dropped++;
      }
      if (changed && reaches_disk (percent))
        d->size = c->size;
      data_resize (d, d->size, true);
      data_copy (c, d);
    }
  }
  /* Directories: each one's unsynced changes all reach the disk or
   * none do (a journal commits a directory's operations in order).
   */
  for (size_t i = 1; i < ninodes; ++i) {
    struct inode *n = inodes[i];
    bool same = true;
    if (n == NULL || !S_ISDIR (n->mode))
      continue;
    if (n->dcur.n != n->ddur.n)
      same = false;
    for (size_t k = 0; same && k < n->dcur.n; ++k) {
      struct dent *e = dir_find (&n->ddur, n->dcur.e[k].name);
      same = e && e->ino == n->dcur.e[k].ino;
    }
    if (same)
      continue;
    if (reaches_disk (percent)) {
      dkept++;
      dir_make_durable (n);
    }
    else
      ddropped++;
  }
  /* current := durable, and the link counts with it. */
  for (size_t i = 1; i < ninodes; ++i)
    if (inodes[i])
      inodes[i]->cur_links = inodes[i]->dur_links;
  for (size_t i = 1; i < ninodes; ++i) {
    struct inode *n = inodes[i];
    if (n == NULL || !S_ISDIR (n->mode))
      continue;
    dir_clear (&n->dcur);
    for (size_t k = 0; k < n->ddur.n; ++k) {
      dir_add (&n->dcur, n->ddur.e[k].name, n->ddur.e[k].ino);
      struct inode *c = get (n->ddur.e[k].ino);
      if (c && S_ISDIR (c->mode))
        c->parent = i;
    }
  }
  for (size_t i = 2; i < ninodes; ++i)
    inode_maybe_free (inodes[i]);
  crashing = false;
  pthread_mutex_unlock (&lock);
  /* Anything read in between is stale now. */
  invalidate_all ();
  printf ("crashed kept %" PRIu64 " dropped %" PRIu64
          " dirs-kept %" PRIu64 " dirs-dropped %" PRIu64 "\n",
          kept, dropped, dkept, ddropped);
  fflush (stdout);
}

static void
sync_all (void)
{
  pthread_mutex_lock (&lock);
  for (size_t i = 1; i < ninodes; ++i) {
    struct inode *n = inodes[i];
    if (n && S_ISREG (n->mode))
      data_copy (&n->dur, &n->cur);
    else if (n && S_ISDIR (n->mode))
      dir_make_durable (n);
  }
  pthread_mutex_unlock (&lock);
  printf ("synced\n");
  fflush (stdout);
}

static void
stats (void)
{
  uint64_t count = 0, pages = 0;

  pthread_mutex_lock (&lock);
  for (size_t i = 1; i < ninodes; ++i)
    if (inodes[i]) {
      count++;
      for (size_t p = 0; p < inodes[i]->cur.npages; ++p)
        pages += inodes[i]->cur.pages[p] != NULL;
    }
  pthread_mutex_unlock (&lock);
  printf ("inodes %" PRIu64 " pages %" PRIu64 "\n", count, pages);
  fflush (stdout);
}

static void
unmount_lazily (void)
{
  if (umount2 (mountpoint, MNT_DETACH) == -1) {
    pid_t pid = fork ();
    if (pid == 0) {
      execlp ("fusermount3", "fusermount3", "-u", "-z", mountpoint,
              (char *) NULL);
      _exit (127);
    }
    if (pid > 0)
      waitpid (pid, NULL, 0);
  }
}

static void *
control (void *arg)
{
  char line[256];
  (void) arg;

  while (fgets (line, sizeof line, stdin)) {
    unsigned percent;
    uint64_t seed;
    if (sscanf (line, "crash %u %" SCNu64, &percent, &seed) == 2)
      crash (percent > 100 ? 100 : percent, seed);
    else if (strcmp (line, "sync\n") == 0)
      sync_all ();
    else if (strcmp (line, "stats\n") == 0)
      stats ();
    else {
      printf ("error: unknown command\n");
      fflush (stdout);
    }
  }
  fuse_session_exit (se);
  unmount_lazily ();
  return NULL;
}

int
main (int argc, char *argv[])
{
  char *fargv[] = { argv[0], "-o", "fsname=powerfs,subtype=powerfs", NULL };
  struct fuse_args args = FUSE_ARGS_INIT (3, fargv);
  pthread_t thr;
  int r;

  if (argc != 2) {
    fprintf (stderr, "usage: powerfs MOUNTPOINT < commands\n");
    return 2;
  }
  mountpoint = argv[1];
  inodes = NULL;
  ninodes = 1;                  /* 0 is no inode */
  inodes = xcalloc (1024, sizeof *inodes);
  struct inode *root = inode_new (S_IFDIR | 0755);
  root->parent = FUSE_ROOT_ID;

  se = fuse_session_new (&args, &ops, sizeof ops, NULL);
  if (se == NULL)
    return 1;
  if (fuse_session_mount (se, mountpoint) != 0)
    return 1;
  printf ("ready\n");
  fflush (stdout);
  if (pthread_create (&thr, NULL, control, NULL) != 0) {
    perror ("pthread_create");
    fuse_session_unmount (se);
    return 1;
  }
  r = fuse_session_loop (se);
  fuse_session_unmount (se);
  fuse_session_destroy (se);
  fuse_opt_free_args (&args);
  return r < 0 ? 1 : 0;
}
