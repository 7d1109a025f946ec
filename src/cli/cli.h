/*
 * cli.h - shared pieces of the ember command-line tool: option tables, parsing
 * (flags and JSON config files share one path), error reporting.
 */
#ifndef EMBER_CLI_H
#define EMBER_CLI_H

#include <stdio.h>

#include "ember.h"

/* One option of a verb. `set` receives the value (NULL for a flag without value) and
 * returns 0 on success, or -1 after printing what is wrong. */
typedef struct {
    const char *name;   /* long name without dashes, e.g. "batch" */
    const char *arg;    /* metavar, or NULL for a boolean flag */
    const char *help;
    int (*set)(void *ctx, const char *value);
} cli_opt;

/* Parse argv (after the verb) against opts; `--config FILE` (if the verb lists it)
 * reads a JSON object whose keys are option names ('_' or '-') and whose values are
 * strings, numbers, booleans or arrays (joined with ','). Positional arguments are
 * returned through pos/npos. Returns 0, 1 if --help was printed, or -1 on error. */
int cli_parse(const char *verb, const char *usage, const cli_opt *opts, int nopts, void *ctx, int argc, char **argv,
              char **pos, int *npos, int max_pos);
void cli_help(FILE *f, const char *verb, const char *usage, const cli_opt *opts, int nopts);

/* Print "ember: <what>: <status> (<detail>)" to stderr. */
void cli_fail(const char *what, em_status st);

int cli_int(const char *opt, const char *v, long long lo, long long hi, long long *out);
int cli_float(const char *opt, const char *v, double *out);

int cmd_train(int argc, char **argv);
int cmd_gen(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_predict(int argc, char **argv);
int cmd_bench(int argc, char **argv);

#endif
