/*
 * ssdtier_db.c - the SSD tier's storage side (ember/ssdtier.h): the working directory,
 * RocksDB (C API) options, keys and values, batch reads and writes, and checkpoints.
 *
 * RocksDB options: no compression (fp32 rows barely compress and the CPU is needed for
 * training), a 10-bit Bloom filter per key (most first sightings of an id are misses on
 * disk, and the filter answers them without reading a block), a block cache of
 * db_cache_bytes, a memtable of db_write_buffer, log level ERROR. The defaults (4 MiB
 * each) leave the memory to the row cache: on Zipf ids a row cache of the same bytes
 * saves more reads than RocksDB's caches do (measured: hit rate 0.61 -> 0.67 and
 * throughput +6% at a 50 MB budget moving 16 MiB of memtable and block cache to it). Writes skip the WAL:
 * the working directory is scratch and only checkpoints are meant to survive a crash,
 * which flush the memtable before RocksDB's checkpoint.
 *
 * ssd.meta (safetensors; values in the checksummed data, so a flipped bit is refused):
 *   ssd.config I64[10]  0 version (1), 1 num_tables, 2 dim, 3 optimizer kind,
 *                       4 state floats per row, 5 pooling, 6 seed (bit-cast), 7 init_scale
 *                       (fp32 bits), 8 init_accum (fp32 bits), 9 reserved 0
 *   ssd.counts I64[11]  0 step, 1 rows on disk, 2 rows created, 3 hits, 4 misses,
 *                       5 prefetch hits, 6 evictions, 7 writebacks, 8 prefetched,
 *                       9 bytes written, 10 bytes read
 *   ssd.table_rows I64[num_tables]  rows created per table
 * with readable copies ssd.tables / ssd.dim / ssd.opt / ssd.step in the metadata.
 */
#define _GNU_SOURCE /* nftw's FTW_DEPTH | FTW_PHYS */
#include "sparse/ssdtier_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ember/safetensors.h"

#define CONFIG_N 10
#define COUNTS_N 11

void em__ssd_cache_clear(em_ssd *s);

/* ------------------------------------------------------------ keys, rows */

void em__ssd_key(char *k, int t, uint64_t id) {
    uint32_t tt = (uint32_t)t;
    for (int i = 0; i < 4; i++) k[i] = (char)(tt >> (24 - 8 * i));
    for (int i = 0; i < 8; i++) k[4 + i] = (char)(id >> (56 - 8 * i));
}

void em__ssd_encode(const em_ssd *s, char *v, const float *row, int64_t count, int64_t last) {
    size_t rb = s->stride * sizeof(float);
    memcpy(v, row, rb);
    memcpy(v + rb, &count, 8);
    memcpy(v + rb + 8, &last, 8);
}

/* As em_dyn's init_row: element i is the top 24 bits of splitmix64(key + i), key from
 * (table seed, id), mapped to [-a, a). */
void em__ssd_init_row(const em_ssd *s, int t, uint64_t id, float *w) {
    em__row_init(w, (size_t)s->D, s->S, s->tabs[t].seed, id, s->cfg.init_scale, s->cfg.opt.init_accum);
}

/* -------------------------------------------------------------- batch I/O */

em_status em__ssd_io_reserve(ssd_io *io, size_t n) {
    if (n <= io->cap) return EM_OK;
    size_t cap = io->cap + io->cap / 2;
    if (cap < n) cap = n;
    char *keys = em_malloc(cap * SSD_KEY_BYTES);
    const char **kp = em_malloc(cap * sizeof(char *));
    size_t *klen = em_malloc(cap * sizeof(size_t)), *vlen = em_malloc(cap * sizeof(size_t));
    char **vals = em_malloc(cap * sizeof(char *)), **errs = em_malloc(cap * sizeof(char *));
    uint32_t *slot = em_malloc(cap * sizeof(uint32_t));
    if (!keys || !kp || !klen || !vlen || !vals || !errs || !slot) {
        em_free(keys), em_free(kp), em_free(klen), em_free(vlen), em_free(vals), em_free(errs), em_free(slot);
        return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the read scratch of %zu keys", n);
    }
    em__ssd_io_free(io);
    io->keys = keys, io->kp = kp, io->klen = klen, io->vlen = vlen, io->vals = vals, io->errs = errs, io->slot = slot;
    io->cap = cap;
    return EM_OK;
}

void em__ssd_io_free(ssd_io *io) {
    em_free(io->keys), em_free(io->kp), em_free(io->klen), em_free(io->vlen), em_free(io->vals), em_free(io->errs);
    em_free(io->slot);
    memset(io, 0, sizeof *io);
}

em_status em__ssd_read_range(em_ssd *s, ssd_io *io, size_t lo, size_t hi, uint64_t *bytes) {
    const size_t n = hi - lo, rb = s->stride * sizeof(float);
    for (size_t i = lo; i < hi; i++) {
        io->kp[i] = io->keys + i * SSD_KEY_BYTES;
        io->klen[i] = SSD_KEY_BYTES;
        io->vals[i] = NULL, io->errs[i] = NULL, io->vlen[i] = 0;
    }
    rocksdb_multi_get(s->db, s->ro, n, io->kp + lo, io->klen + lo, io->vals + lo, io->vlen + lo, io->errs + lo);
    em_status st = EM_OK;
    uint64_t nb = 0;
    for (size_t i = lo; i < hi; i++) {
        const uint32_t slot = io->slot[i];
        ssd_meta *m = ssd_meta_of(s, slot);
        if (io->errs[i]) {
            if (!st) st = em_errorf(EM_ERR_IO, "ssdtier: RocksDB read in %s: %s", s->dbpath, io->errs[i]);
            rocksdb_free(io->errs[i]);
            if (io->vals[i]) rocksdb_free(io->vals[i]);
            continue;
        }
        if (io->vals[i]) {
            if (io->vlen[i] != s->vbytes) {
                if (!st)
                    st = em_errorf(EM_ERR_CORRUPT, "ssdtier: %s: table %d id %llu: value of %zu bytes, expected %zu",
                                   s->dbpath, m->t, (unsigned long long)m->id, io->vlen[i], s->vbytes);
            } else {
                memcpy(ssd_row(s, slot), io->vals[i], rb);
                memcpy(&m->count, io->vals[i] + rb, 8);
                memcpy(&m->last, io->vals[i] + rb + 8, 8);
                m->live = 1, m->ondisk = 1;
                nb += SSD_KEY_BYTES + io->vlen[i];
            }
            rocksdb_free(io->vals[i]);
        } else {
            em__ssd_init_row(s, m->t, m->id, ssd_row(s, slot));
            m->live = 0, m->ondisk = 0, m->count = 0, m->last = -1;
        }
    }
    *bytes += nb;
    return st;
}

static em_status write_batch(em_ssd *s, rocksdb_writebatch_t *wb, size_t rows) {
    char *err = NULL;
    rocksdb_write(s->db, s->wo, wb, &err);
    rocksdb_writebatch_destroy(wb);
    if (err) {
        em_status st = em_errorf(EM_ERR_IO, "ssdtier: RocksDB write of %zu rows in %s: %s", rows, s->dbpath, err);
        rocksdb_free(err);
        return st;
    }
    s->bytes_written += (uint64_t)rows * (SSD_KEY_BYTES + s->vbytes);
    s->writebacks += rows;
    return EM_OK;
}

static void put_slot(em_ssd *s, rocksdb_writebatch_t *wb, uint32_t slot, char *v) {
    const ssd_meta *m = ssd_meta_of(s, slot);
    char key[SSD_KEY_BYTES];
    em__ssd_key(key, m->t, m->id);
    em__ssd_encode(s, v, ssd_row(s, slot), m->count, m->last);
    rocksdb_writebatch_put(wb, key, sizeof key, v, s->vbytes);
}

static void mark_written(em_ssd *s, uint32_t slot) {
    ssd_meta *m = ssd_meta_of(s, slot);
    if (!m->ondisk) s->disk_rows++;
    m->ondisk = 1, m->dirty = 0;
}

em_status em__ssd_write_slots(em_ssd *s, const uint32_t *slots, size_t n) {
    char *v = em_malloc(s->vbytes);
    if (!v) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory to encode a row");
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    for (size_t i = 0; i < n; i++) put_slot(s, wb, slots[i], v);
    em_free(v);
    em_status st = write_batch(s, wb, n);
    if (st) return st;
    for (size_t i = 0; i < n; i++) mark_written(s, slots[i]);
    return EM_OK;
}

em_status em__ssd_write_victims(em_ssd *s, size_t n) {
    size_t nd = 0;
    for (size_t i = 0; i < n; i++) nd += ssd_meta_of(s, s->ev[i].slot)->dirty;
    if (!nd) return EM_OK;
    char *v = em_malloc(s->vbytes);
    if (!v) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory to encode a row");
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    for (size_t i = 0; i < n; i++)
        if (ssd_meta_of(s, s->ev[i].slot)->dirty) put_slot(s, wb, s->ev[i].slot, v);
    em_free(v);
    em_status st = write_batch(s, wb, nd);
    if (st) return st;
    for (size_t i = 0; i < n; i++)
        if (ssd_meta_of(s, s->ev[i].slot)->dirty) mark_written(s, s->ev[i].slot);
    return EM_OK;
}

/* ------------------------------------------------------------------ files */

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

/* Remove a tree; a missing one is fine. */
static int rmtree(const char *p) {
    struct stat sb;
    if (lstat(p, &sb) != 0) return errno == ENOENT ? 0 : -1;
    return nftw(p, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

static char *path_join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = em_malloc(n);
    if (p) snprintf(p, n, "%s/%s", a, b);
    return p;
}

static char *path_cat(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 1;
    char *p = em_malloc(n);
    if (p) snprintf(p, n, "%s%s", a, b);
    return p;
}

static em_status fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return em_errorf(EM_ERR_IO, "ssdtier: cannot open directory %s: %s", dir, strerror(errno));
    int r = fsync(fd);
    int e = errno;
    close(fd);
    if (r != 0 && e != EINVAL) return em_errorf(EM_ERR_IO, "ssdtier: fsync of directory %s: %s", dir, strerror(e));
    return EM_OK;
}

/* fsync the directory that holds `path`. */
static em_status fsync_parent(const char *path) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    while (n > 0 && path[n - 1] != '/') n--;
    if (n == 0) return fsync_dir(".");
    char *d = em_malloc(n + 1);
    if (!d) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory");
    memcpy(d, path, n);
    d[n] = 0;
    em_status st = fsync_dir(d);
    em_free(d);
    return st;
}

static em_status copy_file(const char *src, const char *dst) {
    int in = open(src, O_RDONLY);
    if (in < 0) return em_errorf(EM_ERR_IO, "ssdtier: cannot open %s: %s", src, strerror(errno));
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) {
        em_status st = em_errorf(EM_ERR_IO, "ssdtier: cannot create %s: %s", dst, strerror(errno));
        close(in);
        return st;
    }
    enum { BUF = 1 << 20 };
    char *buf = em_malloc(BUF);
    em_status st = EM_OK;
    if (!buf) st = em_errorf(EM_ERR_NOMEM, "ssdtier: no memory to copy %s", src);
    while (!st) {
        ssize_t r = read(in, buf, BUF);
        if (r == 0) break;
        if (r < 0) {
            if (errno == EINTR) continue;
            st = em_errorf(EM_ERR_IO, "ssdtier: read of %s: %s", src, strerror(errno));
            break;
        }
        for (ssize_t o = 0; o < r && !st;) {
            ssize_t w = write(out, buf + o, (size_t)(r - o));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) st = em_errorf(EM_ERR_IO, "ssdtier: write of %s: %s", dst, strerror(errno));
            else o += w;
        }
    }
    if (!st && fsync(out) != 0) st = em_errorf(EM_ERR_IO, "ssdtier: fsync of %s: %s", dst, strerror(errno));
    em_free(buf);
    close(in);
    if (close(out) != 0 && !st) st = em_errorf(EM_ERR_IO, "ssdtier: close of %s: %s", dst, strerror(errno));
    return st;
}

/* Copy the files of a RocksDB directory: table files (.sst, immutable) hard-linked when
 * the file system allows, everything else (MANIFEST, CURRENT, OPTIONS: RocksDB appends
 * to or replaces them) copied. */
static em_status copy_db_dir(const char *src, const char *dst) {
    DIR *d = opendir(src);
    if (!d) return em_errorf(EM_ERR_CORRUPT, "ssdtier: %s: %s", src, strerror(errno));
    if (mkdir(dst, 0755) != 0) {
        em_status st = em_errorf(EM_ERR_IO, "ssdtier: cannot create %s: %s", dst, strerror(errno));
        closedir(d);
        return st;
    }
    em_status st = EM_OK;
    struct dirent *e;
    while (!st && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *a = path_join(src, e->d_name), *b = path_join(dst, e->d_name);
        if (!a || !b) st = em_errorf(EM_ERR_NOMEM, "ssdtier: no memory");
        else {
            size_t l = strlen(e->d_name);
            int sst = l > 4 && !strcmp(e->d_name + l - 4, ".sst");
            if (!(sst && link(a, b) == 0)) st = copy_file(a, b);
        }
        em_free(a), em_free(b);
    }
    closedir(d);
    if (!st) st = fsync_dir(dst);
    return st;
}

/* Open and lock the marker: one store per working directory (RocksDB's own LOCK file
 * would be wiped with the previous store's files before it could refuse). */
static em_status lock_marker(em_ssd *s) {
    int fd = open(s->marker, O_RDWR | O_CREAT, 0644);
    if (fd < 0) return em_errorf(EM_ERR_IO, "ssdtier: cannot open %s: %s", s->marker, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        close(fd);
        if (e == EWOULDBLOCK) return em_errorf(EM_ERR_INVALID, "ssdtier: %s is in use by another open store", s->path);
        return em_errorf(EM_ERR_IO, "ssdtier: cannot lock %s: %s", s->marker, strerror(e));
    }
    static const char note[] = "ember SSD tier working directory: scratch, removed when the store is freed\n";
    if (ftruncate(fd, 0) != 0 || write(fd, note, sizeof note - 1) != (ssize_t)(sizeof note - 1)) {
        em_status st = em_errorf(EM_ERR_IO, "ssdtier: cannot write %s: %s", s->marker, strerror(errno));
        close(fd);
        return st;
    }
    s->lockfd = fd;
    return EM_OK;
}

em_status em__ssd_workdir_init(em_ssd *s) {
    struct stat sb;
    if (stat(s->path, &sb) != 0) {
        if (errno != ENOENT) return em_errorf(EM_ERR_IO, "ssdtier: %s: %s", s->path, strerror(errno));
        if (mkdir(s->path, 0755) != 0)
            return em_errorf(EM_ERR_IO, "ssdtier: cannot create the working directory %s: %s", s->path, strerror(errno));
        return lock_marker(s);
    }
    if (!S_ISDIR(sb.st_mode)) return em_errorf(EM_ERR_INVALID, "ssdtier: %s exists and is not a directory", s->path);
    if (access(s->marker, F_OK) != 0) {
        DIR *d = opendir(s->path);
        if (!d) return em_errorf(EM_ERR_IO, "ssdtier: %s: %s", s->path, strerror(errno));
        int empty = 1;
        struct dirent *e;
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
        closedir(d);
        if (!empty)
            return em_errorf(EM_ERR_INVALID,
                             "ssdtier: %s is not empty and is not an SSD tier's working directory (no EMBER_SSD "
                             "marker): refusing to use it",
                             s->path);
    }
    em_status st = lock_marker(s);
    if (st) return st;
    char *p = path_cat(s->path, "/db.load");
    if (rmtree(s->dbpath) != 0 || (p && rmtree(p) != 0)) {
        st = em_errorf(EM_ERR_IO, "ssdtier: cannot remove the previous store in %s: %s", s->path, strerror(errno));
        close(s->lockfd);
        s->lockfd = -1;
    }
    em_free(p);
    return st;
}

void em__ssd_workdir_remove(em_ssd *s) {
    (void)rmtree(s->dbpath);
    char *p = path_cat(s->path, "/db.load");
    if (p) (void)rmtree(p);
    em_free(p);
    (void)unlink(s->marker);
    (void)rmdir(s->path);
    if (s->lockfd >= 0) close(s->lockfd);
    s->lockfd = -1;
}

/* --------------------------------------------------------------- RocksDB */

static rocksdb_options_t *make_options(em_ssd *s, int create) {
    rocksdb_options_t *o = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(o, (unsigned char)create);
    rocksdb_options_set_compression(o, rocksdb_no_compression);
    rocksdb_options_set_write_buffer_size(o, s->cfg.db_write_buffer ? s->cfg.db_write_buffer : (size_t)4 << 20);
    rocksdb_options_set_info_log_level(o, 3); /* ERROR */
    rocksdb_options_set_keep_log_file_num(o, 2);
    rocksdb_options_set_max_background_jobs(o, 2);
    rocksdb_block_based_table_options_t *bb = rocksdb_block_based_options_create();
    rocksdb_block_based_options_set_block_cache(bb, s->bcache);
    rocksdb_block_based_options_set_filter_policy(bb, rocksdb_filterpolicy_create_bloom(10));
    rocksdb_options_set_block_based_table_factory(o, bb);
    rocksdb_block_based_options_destroy(bb);
    return o;
}

static em_status open_at(em_ssd *s, const char *dir, int create, rocksdb_t **out) {
    char *err = NULL;
    *out = rocksdb_open(s->opts, dir, &err);
    if (err) {
        em_status st = em_errorf(create ? EM_ERR_IO : EM_ERR_CORRUPT, "ssdtier: RocksDB cannot open %s: %s", dir, err);
        rocksdb_free(err);
        *out = NULL;
        return st;
    }
    return EM_OK;
}

em_status em__ssd_db_open(em_ssd *s, int create) {
    if (!s->bcache) s->bcache = rocksdb_cache_create_lru(s->cfg.db_cache_bytes ? s->cfg.db_cache_bytes : (size_t)4 << 20);
    if (!s->opts) s->opts = make_options(s, 1);
    if (!s->ro) s->ro = rocksdb_readoptions_create();
    if (!s->wo) {
        s->wo = rocksdb_writeoptions_create();
        rocksdb_writeoptions_disable_WAL(s->wo, 1);
    }
    return open_at(s, s->dbpath, create, &s->db);
}

void em__ssd_db_close(em_ssd *s) {
    if (s->db) rocksdb_close(s->db);
    s->db = NULL;
    if (s->opts) rocksdb_options_destroy(s->opts);
    if (s->ro) rocksdb_readoptions_destroy(s->ro);
    if (s->wo) rocksdb_writeoptions_destroy(s->wo);
    if (s->bcache) rocksdb_cache_destroy(s->bcache);
    s->opts = NULL, s->ro = NULL, s->wo = NULL, s->bcache = NULL;
}

/* ------------------------------------------------------------ checkpoints */

static void fill_config(const em_ssd *s, int64_t *c) {
    float is = s->cfg.init_scale, ia = s->cfg.opt.init_accum;
    uint32_t bi, ba;
    memcpy(&bi, &is, 4);
    memcpy(&ba, &ia, 4);
    c[0] = 1, c[1] = s->T, c[2] = s->D, c[3] = (int64_t)s->cfg.opt.kind, c[4] = (int64_t)s->S;
    c[5] = (int64_t)s->cfg.pooling, c[6] = (int64_t)s->cfg.seed, c[7] = (int64_t)bi, c[8] = (int64_t)ba, c[9] = 0;
}

em_status em_ssd_save(em_ssd *s, const char *dir) {
    if (!s || !dir || !*dir) return em_errorf(EM_ERR_INVALID, "ssdtier save: NULL object or directory");
    em_status st = em_ssd_flush(s); /* waits for a prefetch */
    if (st) return st;
    char *err = NULL;
    rocksdb_flushoptions_t *fo = rocksdb_flushoptions_create();
    rocksdb_flushoptions_set_wait(fo, 1);
    rocksdb_flush(s->db, fo, &err);
    rocksdb_flushoptions_destroy(fo);
    if (err) {
        st = em_errorf(EM_ERR_IO, "ssdtier save: RocksDB flush of %s: %s", s->dbpath, err);
        rocksdb_free(err);
        return st;
    }
    char *tmp = path_cat(dir, ".tmp-ssd"), *old = path_cat(dir, ".old-ssd"), *tmpdb = NULL, *meta = NULL;
    if (!tmp || !old || !(tmpdb = path_join(tmp, "db")) || !(meta = path_join(tmp, "ssd.meta"))) {
        st = em_errorf(EM_ERR_NOMEM, "ssdtier save: no memory");
        goto done;
    }
    if (rmtree(tmp) != 0 || mkdir(tmp, 0755) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier save: cannot create %s: %s", tmp, strerror(errno));
        goto done;
    }
    rocksdb_checkpoint_t *cp = rocksdb_checkpoint_object_create(s->db, &err);
    if (!err) rocksdb_checkpoint_create(cp, tmpdb, 0, &err);
    if (cp) rocksdb_checkpoint_object_destroy(cp);
    if (err) {
        st = em_errorf(EM_ERR_IO, "ssdtier save: RocksDB checkpoint into %s: %s", tmpdb, err);
        rocksdb_free(err);
        goto done;
    }
    {
        int64_t config[CONFIG_N], counts[COUNTS_N] = {
            s->step, s->disk_rows, s->rows, (int64_t)s->hits, (int64_t)s->misses, (int64_t)s->prefetch_hits,
            (int64_t)s->evictions, (int64_t)s->writebacks, (int64_t)s->prefetched, (int64_t)s->bytes_written,
            (int64_t)s->bytes_read};
        fill_config(s, config);
        int64_t *trows = em_malloc((size_t)s->T * sizeof(int64_t));
        if (!trows) {
            st = em_errorf(EM_ERR_NOMEM, "ssdtier save: no memory");
            goto done;
        }
        for (int t = 0; t < s->T; t++) trows[t] = s->tabs[t].rows;
        em_st_tensor ts[3] = {{"ssd.config", EM_I64, 1, {CONFIG_N}, config},
                              {"ssd.counts", EM_I64, 1, {COUNTS_N}, counts},
                              {"ssd.table_rows", EM_I64, 1, {s->T}, trows}};
        char sT[24], sD[24], sS[24];
        snprintf(sT, sizeof sT, "%d", s->T);
        snprintf(sD, sizeof sD, "%d", s->D);
        snprintf(sS, sizeof sS, "%lld", (long long)s->step);
        em_st_meta mt[5] = {{"ssd.version", "1"}, {"ssd.tables", sT}, {"ssd.dim", sD},
                            {"ssd.opt", em_optim_name(s->cfg.opt.kind)}, {"ssd.step", sS}};
        st = em_st_write(meta, ts, 3, mt, 5);
        em_free(trows);
        if (st || (st = fsync_dir(tmp))) goto done;
    }
    if (rmtree(old) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier save: cannot remove %s: %s", old, strerror(errno));
        goto done;
    }
    if (access(dir, F_OK) == 0 && rename(dir, old) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier save: cannot move the previous %s aside: %s", dir, strerror(errno));
        goto done;
    }
    if (rename(tmp, dir) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier save: cannot rename %s to %s: %s", tmp, dir, strerror(errno));
        (void)rename(old, dir);
        goto done;
    }
    st = fsync_parent(dir);
    (void)rmtree(old);
done:
    if (st && tmp) (void)rmtree(tmp);
    em_free(tmp), em_free(old), em_free(tmpdb), em_free(meta);
    return st;
}

static const char *config_name(int i) {
    static const char *n[CONFIG_N] = {"format version", "num_tables", "dim", "optimizer", "state size",
                                      "pooling", "seed", "init_scale", "opt.init_accum", "reserved"};
    return n[i];
}

em_status em_ssd_load(em_ssd *s, const char *dir) {
    if (!s || !dir || !*dir) return em_errorf(EM_ERR_INVALID, "ssdtier load: NULL object or directory");
    em_status st = em_ssd_wait(s);
    if (st) return st;
    char *meta = path_join(dir, "ssd.meta"), *cdb = path_join(dir, "db"), *stage = path_cat(s->path, "/db.load"),
         *old = path_cat(s->path, "/db.old");
    em_st *f = NULL;
    rocksdb_t *probe = NULL;
    if (!meta || !cdb || !stage || !old) {
        st = em_errorf(EM_ERR_NOMEM, "ssdtier load: no memory");
        goto done;
    }
    char why[320];
    if ((st = em_st_open(&f, meta))) {
        snprintf(why, sizeof why, "%s", em_last_error());
        st = em_errorf(st, "ssdtier load: %s", why);
        goto done;
    }
    const int64_t *cfg = em_st_expect(f, "ssd.config", EM_I64, CONFIG_N);
    const int64_t *cnt = em_st_expect(f, "ssd.counts", EM_I64, COUNTS_N);
    if (!cfg || !cnt) {
        snprintf(why, sizeof why, "%s", em_last_error());
        st = em_errorf(EM_ERR_CORRUPT, "ssdtier load: %s", why);
        goto done;
    }
    if (cfg[0] != 1) {
        st = em_errorf(EM_ERR_CORRUPT, "ssdtier load: %s: format version %lld (this build reads 1)", meta, (long long)cfg[0]);
        goto done;
    }
    int64_t mine[CONFIG_N];
    fill_config(s, mine);
    for (int i = 1; i < CONFIG_N; i++)
        if (cfg[i] != mine[i]) {
            st = em_errorf(EM_ERR_INVALID, "ssdtier load: %s was saved with %s = %lld, this store has %lld", meta,
                           config_name(i), (long long)cfg[i], (long long)mine[i]);
            goto done;
        }
    const int64_t *trows = em_st_expect(f, "ssd.table_rows", EM_I64, s->T);
    if (!trows) {
        snprintf(why, sizeof why, "%s", em_last_error());
        st = em_errorf(EM_ERR_CORRUPT, "ssdtier load: %s", why);
        goto done;
    }
    for (int i = 0; i < COUNTS_N + s->T; i++)
        if ((i < COUNTS_N ? cnt[i] : trows[i - COUNTS_N]) < 0) {
            st = em_errorf(EM_ERR_CORRUPT, "ssdtier load: %s: count %d is negative", meta, i);
            goto done;
        }
    /* stage a copy, check RocksDB opens it, then swap it in */
    if (rmtree(stage) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier load: cannot remove %s: %s", stage, strerror(errno));
        goto done;
    }
    if ((st = copy_db_dir(cdb, stage))) goto done;
    if ((st = open_at(s, stage, 0, &probe))) goto done;
    rocksdb_close(probe);
    probe = NULL;
    if (rmtree(old) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier load: cannot remove %s: %s", old, strerror(errno));
        goto done;
    }
    rocksdb_close(s->db);
    s->db = NULL;
    if (rename(s->dbpath, old) != 0 || rename(stage, s->dbpath) != 0) {
        st = em_errorf(EM_ERR_IO, "ssdtier load: cannot swap %s in: %s", stage, strerror(errno));
        if (access(s->dbpath, F_OK) != 0) (void)rename(old, s->dbpath);
        if (open_at(s, s->dbpath, 0, &s->db)) s->db = NULL;
        goto done;
    }
    if ((st = open_at(s, s->dbpath, 0, &s->db))) {
        /* put the previous store back */
        (void)rmtree(s->dbpath);
        (void)rename(old, s->dbpath);
        (void)open_at(s, s->dbpath, 0, &s->db);
        goto done;
    }
    (void)rmtree(old);
    em__ssd_cache_clear(s);
    s->step = cnt[0], s->disk_rows = cnt[1], s->rows = cnt[2];
    s->hits = (uint64_t)cnt[3], s->misses = (uint64_t)cnt[4], s->prefetch_hits = (uint64_t)cnt[5];
    s->evictions = (uint64_t)cnt[6], s->writebacks = (uint64_t)cnt[7], s->prefetched = (uint64_t)cnt[8];
    s->bytes_written = (uint64_t)cnt[9], s->bytes_read = (uint64_t)cnt[10];
    for (int t = 0; t < s->T; t++) s->tabs[t].rows = trows[t];
done:
    if (st && stage) (void)rmtree(stage);
    em_st_close(f);
    em_free(meta), em_free(cdb), em_free(stage), em_free(old);
    return st;
}
