/* The SIGBUS guard of guard.h. The handler is installed once, with SA_NODEFER, so a jump out of it leaves
 * SIGBUS unblocked without sigsetjmp saving the signal mask (a system call per guarded stretch). A handler
 * installed later by someone else replaces it; the guard then no longer catches (a documented limit). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "guard.h"

static __thread sigjmp_buf *volatile current; /* the guard active on this thread, or NULL */
static struct sigaction previous;             /* the handler before libthaw's, which unguarded faults reach */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int install_error;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *env = current;
    if (env) {
        current = NULL;
        siglongjmp(*env, 1);
    }
    /* Not a guarded read: behave as if libthaw had never installed a handler. */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler == SIG_DFL) {
        sigaction(SIGBUS, &previous, NULL);
        raise(sig); /* delivered at once (SA_NODEFER): the default action ends the process */
    } else if (previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    }
}

static void install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) install_error = errno ? errno : EINVAL;
}

int guard_install(void) {
    pthread_once(&once, install);
    return install_error;
}

void guard_enter(sigjmp_buf *env) { current = env; }

void guard_leave(void) { current = NULL; }
