/*
 * ssdtier_int.h - the SSD tier's object layout, shared by ssdtier.c (the row cache,
 * forward/backward, prefetch) and ssdtier_db.c (RocksDB, keys and values, checkpoints).
 * Internal to the sparse layer.
 */
#ifndef EMBER_SPARSE_SSDTIER_INT_H
#define EMBER_SPARSE_SSDTIER_INT_H

#include <pthread.h>
#include <rocksdb/c.h>

#include "ember/ssdtier.h"
#include "sparse/rowstore.h"

#define SSD_NONE EM__NONE
#define SSD_PSHIFT 12 /* slots per page: 4096 */
#define SSD_PAGE_ROWS ((uint32_t)1 << SSD_PSHIFT)
#define SSD_PMASK (SSD_PAGE_ROWS - 1)
#define SSD_KEY_BYTES 12

/* A cache slot's metadata. t < 0: a free slot. live = 0: a slot holding the initial row
 * of an id known to be absent from disk (loaded by an eval forward or a prefetch): it
 * reads as zeros in eval and becomes a row at its first training forward. */
typedef struct {
    uint64_t id;
    int64_t count, last;
    int32_t t;
    uint8_t dirty, pinned, ondisk, live, pf;
} ssd_meta;

/* An eviction candidate: the policy's rank (k1, k2, t, id), smallest evicted first. */
typedef struct {
    int64_t k1, k2;
    uint64_t id;
    int32_t t;
    uint32_t slot;
} ssd_evk;

/* Scratch of one batch read (MultiGet) of n keys into slots. */
typedef struct {
    size_t cap;
    char *keys;          /* cap * SSD_KEY_BYTES */
    const char **kp;
    size_t *klen, *vlen;
    char **vals, **errs;
    uint32_t *slot;      /* the slot each key is read into */
} ssd_io;

/* Per table (its positions in the batch of the last forward are s->ub.tab[t]). */
typedef struct {
    int64_t created;  /* rows this forward created */
    int64_t rows;     /* rows created in this table so far */
    uint64_t seed;  /* initial-row stream of the table (as em_dyn's) */
} ssd_tab;

struct em_ssd {
    em_ssd_cfg cfg;
    char *path, *dbpath, *marker;
    int lockfd;          /* the marker, flock'ed while the store is open (-1: none) */
    int T, D;
    size_t S, stride, vbytes; /* state floats; floats per slot; bytes of a stored value */
    int64_t cap_rows, step;

    /* cache: slots in pages (never moved), the page tables sized for cap_rows at create */
    float **rpages;
    ssd_meta **mpages;
    size_t npages, max_pages;
    uint32_t fresh;      /* slots [fresh, npages * PAGE_ROWS) never used */
    uint32_t *freel;     /* max_pages * PAGE_ROWS */
    size_t nfree;
    int64_t used;
    em__idmap map;       /* (table, id) -> slot, home bucket em__idhash(id, salt[table]) */
    size_t hmax;         /* the most buckets the byte limit allows */
    uint64_t *salt;      /* [T] */
    ssd_evk *ev;         /* cap_ev entries */
    size_t cap_ev;

    /* RocksDB */
    rocksdb_t *db;
    rocksdb_options_t *opts;
    rocksdb_readoptions_t *ro;
    rocksdb_writeoptions_t *wo;
    rocksdb_cache_t *bcache;

    /* the batch of the last forward */
    ssd_tab *tabs;
    em__ubatch ub;       /* its ids, uniques, slots; the backward's scratch */
    uint32_t *miss;      /* global unique numbers of the misses (cap_miss) */
    size_t cap_miss;
    int pending, pend_B, pinned_batch;
    int64_t npinned;     /* slots pinned by the last train forward */
    size_t pend_nnz;
    ssd_io io;

    /* prefetch: its own copy of the batch and scratch; the thread owns them while it runs */
    pthread_t pf_thread;
    int pf_running;
    em_status pf_status;
    char pf_err[256];
    uint64_t *pf_ids, *pf_uid, *pf_uhash;
    int32_t *pf_ut;
    uint32_t *pf_map;
    size_t pf_cap, pf_mapcap;
    size_t pf_n;
    int64_t *pf_tbeg;    /* T + 1 */
    ssd_io pf_io;

    /* counters */
    uint64_t hits, misses, prefetch_hits, evictions, writebacks, prefetched, bytes_written, bytes_read;
    int64_t disk_rows, rows;
};

/* ---- ssdtier_db.c ---- */
static inline em__rowpages ssd_rows(const em_ssd *s) { return (em__rowpages){s->rpages, SSD_PSHIFT, SSD_PMASK, s->stride}; }
static inline float *ssd_row(const em_ssd *s, uint32_t slot) {
    return s->rpages[slot >> SSD_PSHIFT] + (size_t)(slot & SSD_PMASK) * s->stride;
}
static inline ssd_meta *ssd_meta_of(const em_ssd *s, uint32_t slot) {
    return s->mpages[slot >> SSD_PSHIFT] + (slot & SSD_PMASK);
}

void em__ssd_key(char *k, int t, uint64_t id);
void em__ssd_encode(const em_ssd *s, char *v, const float *row, int64_t count, int64_t last);
/* Open (create) the RocksDB at s->dbpath with the options of s->cfg. */
em_status em__ssd_db_open(em_ssd *s, int create);
void em__ssd_db_close(em_ssd *s);
/* Prepare the working directory (create, or wipe a previous store's). */
em_status em__ssd_workdir_init(em_ssd *s);
void em__ssd_workdir_remove(em_ssd *s);
em_status em__ssd_io_reserve(ssd_io *io, size_t n);
void em__ssd_io_free(ssd_io *io);
/* Read io->keys[lo, hi) into io->slot[...]: found -> row, state, count, last, ondisk,
 * live; absent -> the initial row, live 0. Adds the bytes read to *bytes. */
em_status em__ssd_read_range(em_ssd *s, ssd_io *io, size_t lo, size_t hi, uint64_t *bytes);
/* The initial row (weights + state) of (t, id). */
void em__ssd_init_row(const em_ssd *s, int t, uint64_t id, float *w);
/* Write the rows of `slots` (n of them) in one WriteBatch; marks them clean and on disk. */
em_status em__ssd_write_slots(em_ssd *s, const uint32_t *slots, size_t n);
em_status em__ssd_write_victims(em_ssd *s, size_t n);

#endif
