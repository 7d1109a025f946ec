/*
 * count.c - how many records a data file holds, cheaply: the header's count for the
 * binary format, a newline count (memchr over 1 MiB reads) for TSV. Used for progress
 * and ETA; a final line without '\n' counts.
 */
#include <string.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "ember/data.h"

em_status em_data_count(const char *path, uint64_t *records) {
    *records = 0;
    if (strcmp(path, "-") == 0) return em_errorf(EM_ERR_UNSUPPORTED, "stdin: the record count is unknown");
    int fd;
    em_status st = em__open_read(path, &fd);
    if (st) return st;
    enum { CAP = 1 << 20 };
    char *buf = em_malloc(CAP);
    if (!buf) {
        close(fd);
        return EM_ERR_NOMEM;
    }
    long got = em__read_full(fd, buf, CAP);
    if (got >= (long)EM__BIN_HDR && memcmp(buf, EM__BIN_MAGIC, 8) == 0) {
        em__bin_header h;
        if ((st = em__bin_get_header((const unsigned char *)buf, &h, path)) == EM_OK) {
            if (h.count == EM__BIN_COUNT_INCOMPLETE)
                st = em_errorf(EM_ERR_CORRUPT, "%s: incomplete binary file (conversion did not finish)", path);
            else *records = h.count;
        }
    } else {
        uint64_t n = 0;
        char last = '\n';
        while (got > 0) {
            for (const char *p = buf; (p = memchr(p, '\n', (size_t)(buf + got - p))); p++) n++;
            last = buf[got - 1];
            got = em__read_full(fd, buf, CAP);
        }
        if (got < 0) st = em_errorf(EM_ERR_IO, "%s: read failed", path);
        *records = n + (last != '\n');
    }
    em_free(buf);
    close(fd);
    return st;
}
