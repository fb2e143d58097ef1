#ifndef MOONLET_CPCRE2_SHIM_H
#define MOONLET_CPCRE2_SHIM_H
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
static inline size_t ml_pcre2_unset(void) { return PCRE2_UNSET; }
static inline size_t ml_pcre2_zero_terminated(void) { return PCRE2_ZERO_TERMINATED; }
#endif
