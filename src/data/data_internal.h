/*
 * data_internal.h - pieces shared by the files of the data layer (not public API):
 * the buffered line source used by the reader and the converter, the ember binary
 * format codec (docs/FORMATS.md), field naming for error messages, and the Zipf
 * sampler of the generator (exposed so tests can check its distribution).
 */
#ifndef EMBER_DATA_INTERNAL_H
#define EMBER_DATA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "ember/core.h"
#include "ember/data.h"

/* Size of the fixed read buffer of readers and the converter. A line must be shorter
 * than this (a Criteo line is ~200-700 bytes); a longer one is malformed. */
#define EM__IO_BUF (1u << 20)

/* ------------------------------------------------------------ line source */
/*
 * Splits a byte stream (a file descriptor) into lines with one fixed buffer of `cap`
 * bytes: no allocation per line, bounded memory whatever the input. A line is the
 * bytes before '\n' (the '\n' is not part of it); a final line without '\n' is still
 * a line; a line of cap bytes or more cannot be held and is reported as too long
 * (its bytes are discarded up to the next '\n' or EOF; it still counts as one line).
 */
typedef struct {
    int fd;
    const char *path; /* for error messages (not owned) */
    char *buf;        /* not owned */
    size_t cap, head, tail;
    int eof;
    int discarding;   /* inside a too-long line: drop bytes until '\n' */
    uint64_t off;     /* byte offset in the input of buf[0] (0 after init; a caller that
                         seeked sets it), so off + head is where the next line starts */
} em__lines;

/* `pre` bytes at buf[0..pre) were already read from fd (format detection). */
void em__lines_init(em__lines *ls, int fd, const char *path, char *buf, size_t cap, size_t pre);
/* EM_OK with *line and *len (pointing into the buffer, valid until the next call) and
 * *too_long (then *line = NULL, *len = 0); EM_ERR_EOF at the end; EM_ERR_IO. */
em_status em__lines_next(em__lines *ls, const char **line, size_t *len, int *too_long);

/* Open `path` for reading ("-" = stdin, fd 0); EM_ERR_IO naming the path on failure. */
em_status em__open_read(const char *path, int *fd);
/* Read until `n` bytes or EOF (retrying EINTR and short reads); returns bytes read or -1. */
long em__read_full(int fd, void *buf, size_t n);

/* ------------------------------------------------------------ binary format */
#define EM__BIN_MAGIC "EMBRDAT1"
#define EM__BIN_VERSION 1u                 /* fixed-size records, no sequences */
#define EM__BIN_VERSION_SEQ 2u             /* blocks of variable-size records with sequences */
#define EM__BIN_HDR 64u
#define EM__BIN_FLAG_LOG1P 1u              /* dense values are log(1 + max(x, 0)) */
#define EM__BIN_COUNT_INCOMPLETE UINT64_MAX /* written first; patched when complete */
#define EM__BIN_BLOCK_MAGIC "EMBK"
#define EM__BIN_BLOCK_HDR 16u
#define EM__BIN_BLOCK_RECORDS 4096u        /* records per block (all blocks but the last) */
#define EM__BIN_MAX_RECORD (1u << 20)      /* a version-2 record fits the read buffer */
#define EM__BIN_EVENT_BYTES 17u            /* item u64 + age i64 + type u8 */

typedef struct {
    uint32_t version, num_dense, num_sparse, flags, record_size; /* record_size: the fixed part */
    uint64_t count;
    /* version 2 only (0 in version 1) */
    uint32_t num_seq, max_events, block_records;
    uint64_t data_size; /* bytes after the header: blocks (headers + records) */
} em__bin_header;

size_t em__bin_record_size(int num_dense, int num_sparse);
void em__bin_put_header(unsigned char out[EM__BIN_HDR], const em__bin_header *h);
/* Validates magic, version, header size, flags, shapes and record size (and, in
 * version 2, the sequence fields). EM_ERR_CORRUPT with a detail naming `path`. */
em_status em__bin_get_header(const unsigned char in[EM__BIN_HDR], em__bin_header *h,
                             const char *path);
void em__bin_put_record(unsigned char *out, int num_dense, int num_sparse, float label,
                        const float *dense, uint64_t missing, const uint64_t *ids);
/* Returns 0 on success, or a static reason when the record is invalid. */
const char *em__bin_get_record(const unsigned char *in, int num_dense, int num_sparse,
                               float *label, float *dense, uint64_t *missing, uint64_t *ids);

/* Version 2: the sequence part of a record (after the fixed part) is num_seq u32
 * event counts, then per feature its items (u64), ages (i64) and types (u8).
 * em__bin_seq_size reads the counts at `in` (4 * num_seq bytes) and gives the part's
 * size; it fails (static reason) when a count exceeds max_events. em__bin_get_seq
 * decodes the part into seq[] (the most recent seq[s].cap events of each) and checks
 * ages (>= 0, non-increasing). em__bin_put_seq writes seq[s].len events of each. */
const char *em__bin_seq_size(const unsigned char *in, int num_seq, uint32_t max_events,
                             size_t *size);
const char *em__bin_get_seq(const unsigned char *in, int num_seq, em_seq_events *seq);
size_t em__bin_put_seq(unsigned char *out, int num_seq, const em_seq_events *seq);
void em__bin_get_block(const unsigned char in[EM__BIN_BLOCK_HDR], int *magic_ok, uint32_t *nrec,
                       uint64_t *payload);

/* Streaming writer of an ember binary dataset: version 1 when num_seq = 0, else
 * version 2. The header goes first with the "incomplete" count; em__binw_close(w,
 * EM_OK) flushes and patches it (so the output must be seekable, checked at open);
 * em__binw_close(w, error) removes a partly written regular file. Memory: one 1 MiB
 * buffer. "-" writes to stdout (which must then be a seekable file). */
typedef struct em__binw em__binw;
em_status em__binw_open(em__binw **out, const char *path, int num_dense, int num_sparse,
                        int num_seq);
/* seq: [num_seq] with len events each (len <= em_seq_bin_max_events); NULL if num_seq = 0. */
em_status em__binw_put(em__binw *w, float label, const float *dense, uint64_t missing,
                       const uint64_t *ids, const em_seq_events *seq);
/* Finishes (s = EM_OK) or abandons the file, frees w (NULL is a no-op returning s). */
em_status em__binw_close(em__binw *w, em_status s);

/* ------------------------------------------------------------ misc */
/* "label", "I<k>" (dense k, 1-based) or "C<k>" (categorical k, 1-based). */
void em__field_name(int field, int num_dense, char *out, size_t cap);

/* Zipf(s) over [0, n) by rejection-inversion (Hormann & Derflinger 1996): O(1) memory,
 * any s > 0 (s = 1 included), expected < 1.1 uniform draws per sample. */
typedef struct {
    double n, s, h_x1, h_n, sq;
} em__zipf;
void em__zipf_init(em__zipf *z, uint64_t n, double s);
uint64_t em__zipf_sample(const em__zipf *z, em_rng *rng);

/* Inverse of the standard normal CDF (Acklam's rational approximation, |rel err| <
 * 1.2e-9) for p in (0, 1): a normal deviate from one uniform, no trigonometry. */
double em__norm_inv(double p);

/* Generator helpers shared by gen.c and gen_drift.c: the Criteo Kaggle cardinality of
 * field f (mod 26); the 8-hex-digit value written for id < card (congruent to id modulo
 * card, see gen.c); writers of v as `digits` lowercase hex digits and of a decimal
 * integer, returning the end of what they wrote (no terminator). */
int64_t em__gen_default_card(int f);
uint64_t em__gen_written_id(uint64_t id, uint64_t card, uint32_t key);
char *em__put_hex(char *o, uint64_t v, int digits);
char *em__put_int(char *o, int64_t v);

#endif
