/*
 * safetensors.c - checkpoint and golden-file container (include/ember/safetensors.h).
 *
 * File layout (all integers little-endian):
 *
 *   OFFSET  SIZE  DESCRIPTION
 *   0       8     N: u64, length of the JSON header (ember writes N % 8 == 0)
 *   8       N     {"__metadata__": {"ember.xxh64": "<16 hex>", k: v, ...},
 *                  "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
 *                 compact JSON padded with spaces
 *   8+N     D     data section: tensors back to back in the order given to the writer;
 *                 [b, e) are relative to 8+N. ember.xxh64 = XXH64(seed 0) of all D bytes
 *                 (everything after the header up to the end of the file).
 *
 * Design choices:
 * - Writing is atomic: path.tmp.<pid> in the same directory, fflush + fsync, rename
 *   over the target, fsync of the directory. A crash leaves either the old file or
 *   the new one, never a torn one; every failure removes the temporary file.
 * - Reading loads the whole file with one em_malloc. The buffer is shifted by a pad so
 *   that the data section starts 8-byte aligned even when a foreign writer left N not
 *   a multiple of 8. The writer packs tensors without gaps (as the format's reference
 *   readers require) and groups them by element size, largest first (data_pass), so
 *   every tensor it writes is naturally aligned when loaded.
 * - Everything read is distrusted: header length, JSON, dtypes, shapes (overflow-safe
 *   products), offsets (within the data section, exact size, no overlap between
 *   non-empty tensors) and the checksum when present. Any failure is EM_ERR_CORRUPT
 *   naming the file and the offending tensor; nothing is dereferenced before its
 *   bounds are known, so a hostile file cannot cause an out-of-bounds read.
 * - The JSON tree (jansson, plain malloc) lives only inside em_st_open/em_st_write;
 *   names and metadata are copied into one em_malloc'd arena, so an open file is three
 *   allocations: the handle, the file bytes and the arena (tensor table, name index,
 *   metadata table, strings).
 * - Tensors keep the order of the header (jansson preserves insertion order), which is
 *   the writer's order; em_st_find binary-searches a name-sorted index.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_STATIC_LINKING_ONLY /* XXH64_state_t on the stack: no malloc */
#include <xxhash.h>

#include "ember/safetensors.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c writes tensor memory as is: it assumes a little-endian host"
#endif

#define ST_MAX_HEADER (100u * 1000u * 1000u) /* larger headers are refused as corrupt */
#define ST_CHECKSUM_KEY "ember.xxh64"

/* ------------------------------------------------------------------ dtypes */

static const struct {
    const char *name;
    size_t size;
} k_dtypes[] = {
    [EM_F32] = {"F32", 4}, [EM_F64] = {"F64", 8}, [EM_I32] = {"I32", 4}, [EM_I64] = {"I64", 8},
    [EM_U64] = {"U64", 8}, [EM_U8] = {"U8", 1},   [EM_F16] = {"F16", 2}, [EM_BF16] = {"BF16", 2},
};
#define N_DTYPES ((int)(sizeof k_dtypes / sizeof k_dtypes[0]))

size_t em_dtype_size(em_dtype t) { return (int)t >= 0 && (int)t < N_DTYPES ? k_dtypes[t].size : 0; }

const char *em_dtype_name(em_dtype t) { return (int)t >= 0 && (int)t < N_DTYPES ? k_dtypes[t].name : "?"; }

static int dtype_from_name(const char *s) {
    for (int i = 0; i < N_DTYPES; i++)
        if (strcmp(s, k_dtypes[i].name) == 0) return i;
    return -1;
}

/* numel of a shape, or -1 when a dimension is negative or the product overflows int64. */
static int64_t shape_numel(const int64_t *shape, int ndim) {
    int64_t numel = 1;
    int zero = 0, overflow = 0;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return -1;
        if (shape[d] == 0) zero = 1;
        else if (numel > INT64_MAX / shape[d]) overflow = 1;
        else numel *= shape[d];
    }
    return zero ? 0 : overflow ? -1 : numel;
}

/* "[3, 4]" into buf, for messages. */
static const char *shape_str(const int64_t *shape, int ndim, char *buf, size_t cap) {
    size_t len = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && len < cap; d++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (len < cap) snprintf(buf + len, cap - len, "]");
    return buf;
}

/* ------------------------------------------------------------------ writer */

static em_status io_error(const char *path) {
    return em_errorf(EM_ERR_IO, "%s: %s", path, strerror(errno));
}

/* The directory holding `path` into dir (room for strlen(path) + 2). */
static void parent_dir(const char *path, char *dir) {
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) : 0;
    if (!slash) strcpy(dir, ".");
    else if (len == 0) strcpy(dir, "/");
    else memcpy(dir, path, len), dir[len] = 0;
}

/* fsync the directory `dir` holding `path`, so that the rename itself is durable. */
static em_status sync_dir(const char *path, const char *dir) {
    em_status st = EM_OK;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        st = em_errorf(EM_ERR_IO, "%s: cannot open directory %s: %s", path, dir, strerror(errno));
    } else {
        /* Some filesystems cannot sync directories (EINVAL); the rename is then as
         * durable as that filesystem makes it, which is not ours to fix. */
        if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS)
            st = em_errorf(EM_ERR_IO, "%s: fsync of directory %s: %s", path, dir, strerror(errno));
        close(fd);
    }
    return st;
}

/* The data section holds the tensors grouped by element size, largest first (8-byte
 * dtypes, then 4, 2, 1), in the caller's order within a group: since the section
 * starts 8-byte aligned, every tensor is then naturally aligned in place. Returns
 * the group (0..3) of a tensor; unknown dtypes go last (and are refused later). */
static int data_pass(const em_st_tensor *t) {
    switch (em_dtype_size(t->dtype)) {
    case 8: return 0;
    case 4: return 1;
    case 2: return 2;
    default: return 3;
    }
}

/* Checks the tensors and metadata and returns the compact header JSON, checksum
 * included (malloc'd by jansson: free()), or NULL with the error in *st. */
static char *build_header(const char *path, const em_st_tensor *ts, int n, const em_st_meta *meta, int n_meta,
                          em_status *st) {
    char sbuf[160];
    json_t *root = json_object(), *md = json_object();
    char *text = NULL;
    *st = EM_OK;
    if (!root || !md || json_object_set(root, "__metadata__", md) != 0) {
        *st = em_errorf(EM_ERR_NOMEM, "%s: out of memory building the header", path);
        goto done;
    }
    XXH64_state_t hs;
    XXH64_reset(&hs, 0);
    int64_t off = 0;
    for (int k = 0; k < 4 * n; k++) { /* in data order, see data_order() */
        int i = k % n;
        if (data_pass(&ts[i]) != k / n) continue;
        const em_st_tensor *t = &ts[i];
        if (!t->name || strcmp(t->name, "__metadata__") == 0) {
            *st = em_errorf(EM_ERR_INVALID, "%s: tensor %d has %s name", path, i, t->name ? "a reserved" : "no");
            goto done;
        }
        if (json_object_get(root, t->name)) {
            *st = em_errorf(EM_ERR_INVALID, "%s: duplicate tensor name '%s'", path, t->name);
            goto done;
        }
        size_t es = em_dtype_size(t->dtype);
        if (!es || t->ndim < 0 || t->ndim > EM_ST_MAX_DIMS) {
            *st = em_errorf(EM_ERR_INVALID, "%s: tensor '%s': bad dtype %d or ndim %d", path, t->name,
                            (int)t->dtype, t->ndim);
            goto done;
        }
        int64_t numel = shape_numel(t->shape, t->ndim);
        if (numel < 0 || numel > (INT64_MAX - off) / (int64_t)es) {
            *st = em_errorf(EM_ERR_INVALID, "%s: tensor '%s': bad shape %s", path, t->name,
                            shape_str(t->shape, t->ndim, sbuf, sizeof sbuf));
            goto done;
        }
        int64_t nbytes = numel * (int64_t)es;
        if (nbytes && !t->data) {
            *st = em_errorf(EM_ERR_INVALID, "%s: tensor '%s' has no data", path, t->name);
            goto done;
        }
        json_t *e = json_object(), *shape = json_array(), *offs = json_array();
        int bad = !e || !shape || !offs;
        for (int d = 0; d < t->ndim && !bad; d++) bad |= json_array_append_new(shape, json_integer(t->shape[d]));
        if (!bad) bad |= json_array_append_new(offs, json_integer(off));
        if (!bad) bad |= json_array_append_new(offs, json_integer(off + nbytes));
        if (!bad) bad |= json_object_set_new(e, "dtype", json_string(em_dtype_name(t->dtype)));
        if (!bad) bad |= json_object_set_new(e, "shape", shape), shape = NULL;
        if (!bad) bad |= json_object_set_new(e, "data_offsets", offs), offs = NULL;
        if (!bad) bad |= json_object_set_new(root, t->name, e); /* steals e, even on failure */
        else json_decref(e);
        json_decref(shape), json_decref(offs);
        if (bad) {
            /* json_object_set_new fails on names that are not valid UTF-8, too. */
            *st = em_errorf(EM_ERR_INVALID, "%s: tensor '%s': name is not valid UTF-8 (or out of memory)", path,
                            t->name);
            goto done;
        }
        if (nbytes) XXH64_update(&hs, t->data, (size_t)nbytes);
        off += nbytes;
    }
    for (int i = 0; i < n_meta; i++) {
        if (!meta[i].key || !meta[i].value) {
            *st = em_errorf(EM_ERR_INVALID, "%s: metadata entry %d has a NULL key or value", path, i);
            goto done;
        }
        if (strcmp(meta[i].key, ST_CHECKSUM_KEY) == 0) continue; /* always ours, computed below */
        json_t *v = json_string(meta[i].value);
        if (!v || json_object_set_new(md, meta[i].key, v) != 0) {
            *st = em_errorf(EM_ERR_INVALID, "%s: metadata '%s': key or value is not valid UTF-8", path, meta[i].key);
            goto done;
        }
    }
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)XXH64_digest(&hs));
    if (json_object_set_new(md, ST_CHECKSUM_KEY, json_string(hex)) != 0 ||
        !(text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER)))
        *st = em_errorf(EM_ERR_NOMEM, "%s: out of memory building the header", path);
done:
    json_decref(md);
    json_decref(root);
    return *st ? (free(text), NULL) : text;
}

em_status em_st_write(const char *path, const em_st_tensor *tensors, int n_tensors, const em_st_meta *meta,
                      int n_meta) {
    if (!path || n_tensors < 0 || n_meta < 0 || (n_tensors && !tensors) || (n_meta && !meta))
        return em_errorf(EM_ERR_INVALID, "em_st_write: bad arguments");
    em_status st;
    char *header = build_header(path, tensors, n_tensors, meta, n_meta, &st);
    if (!header) return st;
    size_t hlen = strlen(header), padded = (hlen + 7) / 8 * 8;

    /* Every allocation happens before the file is touched: an out-of-memory failure
     * never leaves anything behind. */
    size_t plen = strlen(path);
    char *tmp = em_malloc(2 * plen + 34), *dir = tmp + plen + 32;
    if (!tmp) {
        free(header);
        return em_errorf(EM_ERR_NOMEM, "%s: out of memory", path);
    }
    snprintf(tmp, plen + 32, "%s.tmp.%ld", path, (long)getpid());
    parent_dir(path, dir);

    FILE *f = fopen(tmp, "wb");
    if (!f) {
        st = io_error(path);
        goto out;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    static const char spaces[8] = "        ";
    int ok = fwrite(len8, 1, 8, f) == 8 && fwrite(header, 1, hlen, f) == hlen &&
             fwrite(spaces, 1, padded - hlen, f) == padded - hlen;
    for (int k = 0; k < 4 * n_tensors && ok; k++) {
        int i = k % n_tensors;
        if (data_pass(&tensors[i]) != k / n_tensors) continue;
        size_t nb = (size_t)shape_numel(tensors[i].shape, tensors[i].ndim) * em_dtype_size(tensors[i].dtype);
        ok = nb == 0 || fwrite(tensors[i].data, 1, nb, f) == nb;
    }
    if (!ok || fflush(f) != 0 || fsync(fileno(f)) != 0) {
        st = io_error(path);
        fclose(f);
        unlink(tmp);
        goto out;
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        st = io_error(path);
        unlink(tmp);
        goto out;
    }
    st = sync_dir(path, dir);
out:
    free(header);
    em_free(tmp);
    return st;
}

/* ------------------------------------------------------------------ reader */

struct em_st {
    char *path;
    unsigned char *buf;   /* the file, at buf + pad */
    em_st_tensor *t;      /* [n], header order */
    const em_st_tensor **by_name; /* [n] sorted by name */
    em_st_meta *meta;     /* [n_meta] */
    int n, n_meta;
    void *arena;          /* t, by_name, meta and their strings */
    uint64_t data_hash;   /* XXH64 of the data section, computed while reading it */
};

typedef struct {
    int64_t b, e;
    int i;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->b != y->b) return x->b < y->b ? -1 : 1;
    if (x->e != y->e) return x->e < y->e ? -1 : 1;
    return x->i - y->i;
}

static int name_cmp(const void *a, const void *b) {
    return strcmp((*(const em_st_tensor *const *)a)->name, (*(const em_st_tensor *const *)b)->name);
}

/* Read exactly n bytes at offset off; 0 on success, else errno-style failure (with
 * errno = 0 meaning the file was shorter than expected). */
static int pread_full(int fd, void *dst, size_t n, off_t off) {
    unsigned char *p = dst;
    while (n) {
        ssize_t r = pread(fd, p, n > (1u << 30) ? (1u << 30) : n, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (r == 0) errno = 0;
            return -1;
        }
        p += r, n -= (size_t)r, off += r;
    }
    return 0;
}

/* Loads the file: on success st->buf holds it and *file / *size describe it. */
static em_status load_file(em_st *st, const char *path, unsigned char **file, size_t *size, uint64_t *hlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return io_error(path);
    em_status s = EM_OK;
    struct stat sb;
    unsigned char len8[8];
    if (fstat(fd, &sb) != 0) {
        s = io_error(path);
    } else if (!S_ISREG(sb.st_mode)) {
        s = em_errorf(EM_ERR_IO, "%s: not a regular file", path);
    } else if (sb.st_size < 8) {
        s = em_errorf(EM_ERR_CORRUPT, "%s: file of %lld bytes is too small for a safetensors header", path,
                      (long long)sb.st_size);
    } else if ((uint64_t)sb.st_size > SIZE_MAX - 64) {
        s = em_errorf(EM_ERR_NOMEM, "%s: file of %lld bytes does not fit in memory", path, (long long)sb.st_size);
    } else if (pread_full(fd, len8, 8, 0) != 0) {
        s = errno ? io_error(path) : em_errorf(EM_ERR_CORRUPT, "%s: file shrank while reading", path);
    } else {
        uint64_t n = 0;
        for (int i = 0; i < 8; i++) n |= (uint64_t)len8[i] << (8 * i);
        size_t fsize = (size_t)sb.st_size;
        if (n > ST_MAX_HEADER) {
            s = em_errorf(EM_ERR_CORRUPT, "%s: header length %llu is implausible (limit %u bytes)", path,
                          (unsigned long long)n, ST_MAX_HEADER);
        } else if (n > fsize - 8) {
            s = em_errorf(EM_ERR_CORRUPT, "%s: header length %llu exceeds the file (%zu bytes): truncated?", path,
                          (unsigned long long)n, fsize);
        } else {
            /* Shift the file so that buf + pad + 8 + n is 8-aligned (buf is 64-aligned). */
            size_t pad = (size_t)((8 - n % 8) % 8);
            st->buf = em_malloc(fsize + pad);
            /* 2 MB pages for a large file: reading into 4 KB pages costs one page fault
             * each, which made loading a 2.2 GB checkpoint take 16 s on a VM (12 s of it
             * in the kernel) */
            if (st->buf) em_advise_huge(st->buf, fsize + pad);
            if (!st->buf) {
                s = em_errorf(EM_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, fsize);
            } else {
                /* read in chunks and hash the data section [8 + n, fsize) as each chunk
                 * comes in, while it is still in cache (one pass over the memory less) */
                const size_t CH = (size_t)8 << 20, d0 = 8 + (size_t)n;
                unsigned char *f = st->buf + pad;
                XXH64_state_t hs;
                XXH64_reset(&hs, 0);
                for (size_t off = 0; off < fsize && !s; off += CH) {
                    const size_t len = fsize - off < CH ? fsize - off : CH;
                    if (pread_full(fd, f + off, len, (off_t)off) != 0) {
                        s = errno ? io_error(path) : em_errorf(EM_ERR_CORRUPT, "%s: file shrank while reading", path);
                    } else if (off + len > d0) {
                        const size_t b = off > d0 ? off : d0;
                        XXH64_update(&hs, f + b, off + len - b);
                    }
                }
                if (!s) *file = f, *size = fsize, *hlen = n, st->data_hash = XXH64_digest(&hs);
            }
        }
    }
    close(fd);
    return s;
}

/* Validates one tensor entry and fills *t (name set by the caller); *sp gets its span. */
static em_status parse_tensor(const char *path, const char *name, json_t *v, size_t dsize, em_st_tensor *t,
                              span *sp) {
    char sbuf[160];
    if (!json_is_object(v)) return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': entry is not an object", path, name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd)) return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': missing dtype", path, name);
    int dt = dtype_from_name(json_string_value(jd));
    if (dt < 0)
        return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': unknown dtype '%.32s'", path, name, json_string_value(jd));
    t->dtype = (em_dtype)dt;
    if (!json_is_array(js) || json_array_size(js) > EM_ST_MAX_DIMS)
        return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': shape is not an array of at most %d dims", path, name,
                         EM_ST_MAX_DIMS);
    t->ndim = (int)json_array_size(js);
    for (int d = 0; d < t->ndim; d++) {
        json_t *x = json_array_get(js, (size_t)d);
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': shape[%d] is not a non-negative integer", path, name, d);
        t->shape[d] = (int64_t)json_integer_value(x);
    }
    int64_t numel = shape_numel(t->shape, t->ndim);
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': data_offsets is not [begin, end]", path, name);
    long long b = json_integer_value(json_array_get(jo, 0)), e = json_integer_value(json_array_get(jo, 1));
    if (b < 0 || e < b)
        return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': data_offsets [%lld, %lld] are not ordered", path, name, b,
                         e);
    if ((uint64_t)e > dsize)
        return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': data_offsets [%lld, %lld] exceed data section of %zu bytes",
                         path, name, b, e, dsize);
    size_t es = em_dtype_size(t->dtype);
    if (numel < 0 || (uint64_t)numel > (uint64_t)(e - b) / es || (uint64_t)numel * es != (uint64_t)(e - b))
        return em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s': data_offsets [%lld, %lld] hold %lld bytes, but %s %s needs %s",
                         path, name, b, e, e - b, k_dtypes[dt].name, shape_str(t->shape, t->ndim, sbuf, sizeof sbuf),
                         numel < 0 ? "more than 2^63" : "a different size");
    sp->b = b, sp->e = e;
    return EM_OK;
}

/* Parses and validates the header into st's arena. */
static em_status parse_header(em_st *st, const char *path, const unsigned char *file, size_t fsize, uint64_t hlen) {
    const unsigned char *data = file + 8 + hlen;
    size_t dsize = fsize - 8 - (size_t)hlen;
    json_error_t jerr;
    json_t *root = json_loadb((const char *)file + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return em_errorf(EM_ERR_CORRUPT, "%s: header JSON is malformed: %s (line %d, column %d)", path, jerr.text,
                         jerr.line, jerr.column);
    em_status s = EM_OK;
    span *spans = NULL;
    if (!json_is_object(root)) {
        s = em_errorf(EM_ERR_CORRUPT, "%s: header is not a JSON object", path);
        goto done;
    }
    /* Pass 1: count entries and string bytes, so the arena is one allocation. */
    size_t n = 0, n_meta = 0, strbytes = 0;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") != 0) {
            n++, strbytes += strlen(key) + 1;
            continue;
        }
        if (!json_is_object(v)) {
            s = em_errorf(EM_ERR_CORRUPT, "%s: __metadata__ is not an object", path);
            goto done;
        }
        const char *mk;
        json_t *mv;
        json_object_foreach(v, mk, mv) {
            if (!json_is_string(mv)) {
                s = em_errorf(EM_ERR_CORRUPT, "%s: metadata '%s' is not a string", path, mk);
                goto done;
            }
            n_meta++, strbytes += strlen(mk) + 1 + json_string_length(mv) + 1;
        }
    }
    size_t tbytes = n * sizeof(em_st_tensor), ibytes = n * sizeof(em_st_tensor *);
    size_t mbytes = n_meta * sizeof(em_st_meta);
    char *arena = em_malloc(tbytes + ibytes + mbytes + strbytes + 1);
    spans = em_malloc((n ? n : 1) * sizeof(span));
    if (!arena || !spans) {
        em_free(arena);
        s = em_errorf(EM_ERR_NOMEM, "%s: out of memory parsing the header", path);
        goto done;
    }
    st->arena = arena;
    st->t = (em_st_tensor *)arena;
    st->by_name = (const em_st_tensor **)(arena + tbytes);
    st->meta = (em_st_meta *)(arena + tbytes + ibytes);
    char *strs = arena + tbytes + ibytes + mbytes;

    /* Pass 2: validate and copy. */
    const char *checksum = NULL;
    json_object_foreach(root, key, v) {
        size_t kl = strlen(key) + 1;
        if (strcmp(key, "__metadata__") == 0) {
            const char *mk;
            json_t *mv;
            json_object_foreach(v, mk, mv) {
                size_t ml = strlen(mk) + 1, vl = json_string_length(mv) + 1;
                em_st_meta *m = &st->meta[st->n_meta++];
                m->key = memcpy(strs, mk, ml), strs += ml;
                m->value = memcpy(strs, json_string_value(mv), vl), strs += vl;
                if (strcmp(mk, ST_CHECKSUM_KEY) == 0) checksum = m->value;
            }
            continue;
        }
        em_st_tensor *t = &st->t[st->n];
        memset(t, 0, sizeof *t);
        t->name = memcpy(strs, key, kl), strs += kl;
        if ((s = parse_tensor(path, t->name, v, dsize, t, &spans[st->n]))) goto done;
        t->data = data + spans[st->n].b;
        spans[st->n].i = st->n;
        st->by_name[st->n] = t;
        st->n++;
    }
    /* Non-empty tensors must not share bytes (empty ones own none). */
    qsort(spans, n, sizeof *spans, span_cmp);
    const span *prev = NULL;
    for (size_t i = 0; i < n; i++) {
        if (spans[i].b == spans[i].e) continue;
        if (prev && spans[i].b < prev->e) {
            s = em_errorf(EM_ERR_CORRUPT, "%s: tensors '%s' [%lld, %lld] and '%s' [%lld, %lld] overlap", path,
                          st->t[prev->i].name, (long long)prev->b, (long long)prev->e, st->t[spans[i].i].name,
                          (long long)spans[i].b, (long long)spans[i].e);
            goto done;
        }
        prev = &spans[i];
    }
    if (checksum) {
        size_t len = strlen(checksum);
        int hex = len == 16;
        for (size_t i = 0; i < len && hex; i++)
            hex = (checksum[i] >= '0' && checksum[i] <= '9') || (checksum[i] >= 'a' && checksum[i] <= 'f');
        if (!hex) {
            s = em_errorf(EM_ERR_CORRUPT, "%s: metadata " ST_CHECKSUM_KEY " '%.40s' is not 16 lowercase hex digits",
                          path, checksum);
            goto done;
        }
        char got[17];
        snprintf(got, sizeof got, "%016llx", (unsigned long long)st->data_hash); /* of data[0, dsize), load_file */
        if (strcmp(got, checksum) != 0) {
            s = em_errorf(EM_ERR_CORRUPT,
                          "%s: checksum mismatch: file is corrupt or truncated (header says %s, data hashes to %s)",
                          path, checksum, got);
            goto done;
        }
    }
    qsort(st->by_name, n, sizeof *st->by_name, name_cmp);
done:
    em_free(spans);
    json_decref(root);
    return s;
}

em_status em_st_open(em_st **out, const char *path) {
    *out = NULL;
    if (!path) return em_errorf(EM_ERR_INVALID, "em_st_open: NULL path");
    em_st *st = em_calloc(1, sizeof *st);
    if (!st || !(st->path = em_strdup(path))) {
        em_free(st);
        return em_errorf(EM_ERR_NOMEM, "%s: out of memory", path);
    }
    unsigned char *file = NULL;
    size_t fsize = 0;
    uint64_t hlen = 0;
    em_status s = load_file(st, path, &file, &fsize, &hlen);
    if (!s) s = parse_header(st, path, file, fsize, hlen);
    if (s) {
        em_st_close(st);
        return s;
    }
    *out = st;
    return EM_OK;
}

void em_st_close(em_st *st) {
    if (!st) return;
    em_free(st->arena);
    em_free(st->buf);
    em_free(st->path);
    em_free(st);
}

int em_st_count(const em_st *st) { return st->n; }

const em_st_tensor *em_st_at(const em_st *st, int i) { return i >= 0 && i < st->n ? &st->t[i] : NULL; }

const em_st_tensor *em_st_find(const em_st *st, const char *name) {
    int lo = 0, hi = st->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(st->by_name[mid]->name, name);
        if (c == 0) return st->by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const char *em_st_meta_get(const em_st *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta[i].key, key) == 0) return st->meta[i].value;
    return NULL;
}

const void *em_st_expect(const em_st *st, const char *name, em_dtype dtype, int64_t numel) {
    const em_st_tensor *t = em_st_find(st, name);
    if (!t) {
        em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s' not found", st->path, name);
        return NULL;
    }
    if (t->dtype != dtype) {
        em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s' is %s, expected %s", st->path, name, em_dtype_name(t->dtype),
                  em_dtype_name(dtype));
        return NULL;
    }
    int64_t have = shape_numel(t->shape, t->ndim);
    if (have != numel) {
        char sbuf[160];
        em_errorf(EM_ERR_CORRUPT, "%s: tensor '%s' has %lld elements (shape %s), expected %lld", st->path, name,
                  (long long)have, shape_str(t->shape, t->ndim, sbuf, sizeof sbuf), (long long)numel);
        return NULL;
    }
    return t->data;
}
