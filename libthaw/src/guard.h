/* A guard for reads through a file mapping: a SIGBUS (the file was truncated under the mapping, or its
 * storage failed) inside a guarded stretch of code jumps back to the guard instead of killing the process.
 *
 *     sigjmp_buf env;
 *     if (sigsetjmp(env, 0)) { ...the mapping faulted: report it... }
 *     guard_enter(&env);
 *     ...read the mapping...
 *     guard_leave();
 *
 * guard_install() must have succeeded first. The guard is per thread; a SIGBUS outside any guard goes to the
 * handler that was installed before libthaw's (by default: the process dies, as it would have). */
#ifndef THAW_GUARD_H
#define THAW_GUARD_H

#include <setjmp.h>

/* Install libthaw's SIGBUS handler once per process; 0 on success, else an errno. */
int guard_install(void);
void guard_enter(sigjmp_buf *env);
void guard_leave(void);

#endif
