/*
 * main.c - `ember <verb>`: dispatch and top-level help. Exit codes: 0 success, 1 the
 * work failed, 2 bad usage (unknown verb or option, bad value).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/blas.h"

static const struct {
    const char *name, *help;
    int (*fn)(int, char **);
} verbs[] = {
    {"train", "train a DLRM (with no data given: generate the embedded default dataset and train on it)", cmd_train},
    {"eval", "evaluate a checkpoint on a labelled file (AUC, log loss, NE, calibration, accuracy)", cmd_eval},
    {"predict", "write the click probability of every line of a TSV file", cmd_predict},
    {"gen", "generate synthetic Criteo-format data with a planted ground truth", cmd_gen},
    {"convert", "convert Criteo TSV to ember's binary format (streaming)", cmd_convert},
    {"serve", "answer predictions over HTTP (JSON and binary) with dynamic batching", cmd_serve},
    {"bench", "training throughput on synthetic in-memory batches (compare with bench/dlrm_torch.py)", cmd_bench},
    {"inspect", "what a checkpoint holds: per table rows, live chunks (FIITED), bytes, optimizer state (--json)", cmd_inspect},
    {"plan", "shard embedding tables over N ranks (1D or 2D groups) and predict per-rank load; --simulate 8..4096 ranks", cmd_plan},
    {"stream", "train on an unbounded stream (file, growing directory, stdin) in windows: progressive metrics, exact resume; ExFM teacher/student", cmd_stream},
    {"exfm", "ExFM pipeline: a teacher streams all verticals and logs its predictions, then students per vertical x distillation mode", cmd_exfm},
};

static void usage(FILE *f) {
    fprintf(f, "usage: ember <verb> [options]      (ember <verb> --help for a verb's options)\n\nverbs:\n");
    for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++) fprintf(f, "  %-9s %s\n", verbs[i].name, verbs[i].help);
    fprintf(f, "  %-9s %s\n", "version", "the build and the BLAS kernels in use (blas_core=...)");
}

/* Re-execute with OPENBLAS_CORETYPE set when OpenBLAS chose weaker kernels; returns
 * only if nothing needs doing or the exec failed (then the run goes on as it is). */
static void blas_kernels(char **argv) {
    if (getenv("OPENBLAS_CORETYPE")) return;
    const char *c = em_blas_better_coretype();
    if (!c || setenv("OPENBLAS_CORETYPE", c, 1) != 0) return;
    execv("/proc/self/exe", argv);
    unsetenv("OPENBLAS_CORETYPE");
}

static int cmd_version(int argc, char **argv) {
    (void)argc, (void)argv;
    const char *better = em_blas_better_coretype();
    printf("ember (built %s)\nblas_core=%s\n", __DATE__, em_blas_corename());
    if (better) printf("note: this CPU supports OpenBLAS's %s kernels; run with OPENBLAS_CORETYPE=%s\n", better, better);
    return 0;
}

int main(int argc, char **argv) {
    blas_kernels(argv);
    if (argc >= 2 && (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0)) return cmd_version(argc, argv);
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++)
        if (strcmp(argv[1], verbs[i].name) == 0) {
            int rc = verbs[i].fn(argc - 2, argv + 2);
            cli_release(); /* strings a --config file gave the verb */
            return rc;
        }
    fprintf(stderr, "ember: unknown verb '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
