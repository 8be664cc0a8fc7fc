/* Linked into every llvm model.so (thread_pool.py): the pool's size at load, and how the artifact's
 * parallel work shares the cores with the rest of the process.
 *
 * 1. A constructor, run when the library is loaded and so before TVM's pool starts, sets
 *    TVM_NUM_THREADS to the cores the kernels were laid out for (at most the CPUs the process may
 *    use) and TVM_THREAD_POOL_SPIN_COUNT to SPIN_COUNT, unless the user set them. TVM's default,
 *    300000 sched_yield()s, keeps a worker on a core for ~140 ms after every call (seconds when the
 *    core is shared): an ONNX Runtime run timed after ours on the 2-core Zen 4 VM took 48 ms
 *    instead of 22.
 *
 * 2. Every parallel launch and barrier of the generated code goes through lstm_export_launch and
 *    lstm_export_barrier: the codegen calls them through the function pointers
 *    __TVMBackendParallelLaunch and __TVMBackendParallelBarrier, which TVM's loader fills by dlsym
 *    at load. Defined here, strong and hidden, they win over the generated weak ones, are not
 *    exported, and so keep our values. Both call TVM's own functions (the runtime's symbols are
 *    global: TVM loads libtvm_runtime RTLD_GLOBAL, and a C++ deployment links it).
 *
 *    A kernel split over n tasks waits for the slowest at every barrier (one per step), so a task
 *    whose core another thread holds (ONNX Runtime's pool spinning after a run, the application's
 *    own work) stalls every step for a scheduler slice: one streaming step took 7.5 ms instead of
 *    0.075. A wait at a barrier, or for the other tasks at a launch's end, that is both long and
 *    longer than the work before it (taken() below), three times within CONFIRM_NS, means a core
 *    is taken (one or two are a hiccup: a VM's vCPU descheduled by the host). Then launches run on
 *    the calling thread alone (one task: the same arithmetic, so the same bits) for a spell, after
 *    which one launch probes the full pool again.
 *    A probe that stalls doubles the spell (up to SPELL_MAX_NS); one that does not resets it.
 *
 * Invariant: the state below is advice, read and written with relaxed atomics by any thread; a
 * lost update costs one probe, never a wrong result (any task count computes the same numbers).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef struct { void *sync_handle; int32_t num_task; } lstm_export_env;
typedef int (*lstm_export_lambda)(int task_id, lstm_export_env *penv, void *cdata);
extern int TVMBackendParallelLaunch(lstm_export_lambda flambda, void *cdata, int num_task);
extern int TVMBackendParallelBarrier(int task_id, lstm_export_env *penv);

#define SPIN_COUNT "10000"            /* ~5 ms of sched_yield on the Zen 4 VM: a worker stays warm between close calls */
/* On the Zen 4 VM over 2 s of back-to-back calls, quiet: waits >= 64 us at 30-300 barriers, >= 1 ms at
 * 3-14, >= 2 ms at 0-1; beside a busy thread, hundreds >= 2 ms (a scheduler slice, 2-4 ms) */
#define STALL_NS 2000000LL
#define CONFIRM_NS 20000000LL       /* three stalls this close: the core stays taken (a quiet VM had pairs) */
#define SPELL_MIN_NS 50000000LL       /* ONNX Runtime's pool spins ~40 ms after a run */
#define SPELL_MAX_NS 200000000LL      /* probes at least 5 times a second: back to the full pool soon after the load goes */

/* the cores this artifact's kernels were laid out for (the target's num-cores) */
int lstm_export_cores = LSTM_EXPORT_CORES;
/* stalls seen and launches run alone: for tests and benchmarks (ctypes), not for control */
long long lstm_export_stalls = 0, lstm_export_alone = 0;
/* long waits at barriers and launch ends, by length: >= 64 us << i (i = 0..7) */
long long lstm_export_waits[8];

/* the last two stalls: a third within CONFIRM_NS of the older one starts a spell */
static long long alone_until = 0, spell = SPELL_MIN_NS;
static long long last_stall = -CONFIRM_NS - 1, stall_before = -CONFIRM_NS - 1;
static int probing = 0;
/* 0 (LSTM_EXPORT_SHARE_CORES=0 at load, or set through ctypes): TVM's launches and barriers as they are */
int lstm_export_share_cores = 1;

__attribute__((constructor)) static void lstm_export_size_thread_pool(void) {
  const char *share = getenv("LSTM_EXPORT_SHARE_CORES");
  if (share && share[0] == '0') lstm_export_share_cores = 0;
  if (!getenv("TVM_THREAD_POOL_SPIN_COUNT")) setenv("TVM_THREAD_POOL_SPIN_COUNT", SPIN_COUNT, 0);
  if (getenv("TVM_NUM_THREADS") || getenv("OMP_NUM_THREADS")) return; /* the user's choice wins */
  int n = LSTM_EXPORT_CORES;
#ifdef CPU_COUNT
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0 && CPU_COUNT(&set) < n)
    n = CPU_COUNT(&set);
#endif
  char text[16];
  snprintf(text, sizeof(text), "%d", n);
  setenv("TVM_NUM_THREADS", text, 0);
}

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

static void stalled(long long t) {
  __atomic_add_fetch(&lstm_export_stalls, 1, __ATOMIC_RELAXED);
  long long s = LOAD(spell), older = LOAD(stall_before);
  STORE(stall_before, LOAD(last_stall));
  STORE(last_stall, t);
  if (LOAD(probing)) { /* the full pool stalled again right after a spell alone */
    s = s * 2 > SPELL_MAX_NS ? SPELL_MAX_NS : s * 2;
    STORE(spell, s);
    STORE(probing, 0);
  } else if (t - older > CONFIRM_NS) {
    return; /* one or two stalls are a hiccup of the host (a VM's vCPU descheduled): no spell */
  }
  STORE(alone_until, t + s);
}

/* when this thread last started a task or left a barrier: its work since is the yardstick of a wait */
static __thread long long mark;

/* A wait means a taken core when it is long (STALL_NS) and longer than the work before it: the
 * kernel would then have run faster on one thread. A slow step on a quiet machine (a page fault, an
 * uneven split) fails the second test. */
static int taken(long long work, long long wait) {
  if (wait >= 64000) {
    int i = 0;
    while (i < 7 && wait >= (64000LL << (i + 1))) i++;
    __atomic_add_fetch(&lstm_export_waits[i], 1, __ATOMIC_RELAXED);
  }
  return wait >= STALL_NS && wait >= work;
}

int lstm_export_barrier(int task_id, lstm_export_env *penv) {
  if (!LOAD(lstm_export_share_cores)) return TVMBackendParallelBarrier(task_id, penv);
  long long t0 = now_ns();
  int rc = TVMBackendParallelBarrier(task_id, penv);
  long long t1 = now_ns();
  if (taken(t0 - mark, t1 - t0)) stalled(t1);
  mark = t1;
  return rc;
}

typedef struct {
  lstm_export_lambda f;
  void *cdata;
  long long first_done; /* when task 0 (the calling thread's) returned */
} timed_t;

static int timed_task(int task_id, lstm_export_env *penv, void *cdata) {
  timed_t *w = (timed_t *)cdata;
  mark = now_ns();
  int rc = w->f(task_id, penv, w->cdata);
  if (task_id == 0) w->first_done = now_ns();
  return rc;
}

/* num_task 0 (a TIR parallel loop: the whole pool) or the tasks an extern kernel asks for */
int lstm_export_launch(lstm_export_lambda f, void *cdata, int num_task) {
  if (num_task == 1 || !LOAD(lstm_export_share_cores)) return TVMBackendParallelLaunch(f, cdata, num_task);
  long long t0 = now_ns(), until = LOAD(alone_until);
  if (until) {
    if (t0 < until) {
      __atomic_add_fetch(&lstm_export_alone, 1, __ATOMIC_RELAXED);
      return TVMBackendParallelLaunch(f, cdata, 1);
    }
    STORE(alone_until, 0); /* the spell is over: this launch probes the full pool */
    STORE(probing, 1);
  }
  timed_t w = {f, cdata, 0};
  int rc = TVMBackendParallelLaunch(timed_task, &w, num_task);
  long long t1 = now_ns();
  if (w.first_done && taken(w.first_done - t0, t1 - w.first_done)) {
    stalled(t1);
  } else if (LOAD(probing) && !LOAD(alone_until)) { /* a probe that ran well */
    STORE(probing, 0);
    STORE(spell, SPELL_MIN_NS);
  }
  return rc;
}

__attribute__((visibility("hidden"))) void *__TVMBackendParallelLaunch = (void *)lstm_export_launch;
__attribute__((visibility("hidden"))) void *__TVMBackendParallelBarrier = (void *)lstm_export_barrier;
