/* The exit rule the C decode paths share: the in-process kernel (decode_kernel.c) and the runtime
 * (lr_loop.c) decide Q-exit with this one function, as looplm.exit_policy.QExit does in Python. */
#ifndef LOOPLM_EXIT_RULE_H
#define LOOPLM_EXIT_RULE_H

#include <math.h>

/* Q-exit's step for a gate logit z: log survival += log σ(−z) (float64, stably); returns whether the
 * exit CDF 1 − survival has reached q. */
static inline int q_exit_reached(double z, double *log_survival, double q) {
    *log_survival -= z > 0 ? z + log1p(exp(-z)) : log1p(exp(z));
    return -expm1(*log_survival) >= q;
}

#endif /* LOOPLM_EXIT_RULE_H */
