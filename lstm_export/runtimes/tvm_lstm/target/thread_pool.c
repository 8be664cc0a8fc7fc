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
 *    exported, and so keep our values.
 *
 * 3. The generated code's parallel loops (num_task 0; the LSTM kernel's steps, the generic
 *    kernels) run on the claiming pool below, not TVM's: a worker whose core another thread holds
 *    (ONNX Runtime's pool spinning after a run, the application's own work) no longer holds up
 *    every step for a scheduler slice (one streaming step took 7.5 ms instead of 0.075): the
 *    threads that run take its share (docs/cpu_kernel.md, "Sharing the cores", has the numbers).
 *
 * 4. Launches that ask for tasks (the bf16/int8 engine, lowp_lstm.c, with a barrier per step) call
 *    TVM's own functions (the runtime's symbols are global: TVM loads libtvm_runtime RTLD_GLOBAL,
 *    and a C++ deployment links it), under a policy: a wait at a barrier, or for the other tasks
 *    at a launch's end, that is both long and longer than the work before it (taken() below), three
 *    times within CONFIRM_NS, means a core is taken (one or two are a hiccup: a VM's vCPU
 *    descheduled by the host). Then launches run on the calling thread alone (one task: the same
 *    arithmetic, so the same bits) for a spell, after which one launch probes the full pool again.
 *    A probe that stalls doubles the spell (up to SPELL_MAX_NS); one that does not resets it.
 *
 * Invariant: the policy's state below is advice, read and written with relaxed atomics by any thread; a
 * lost update costs one probe, never a wrong result (any task count computes the same numbers).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#endif

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
  if (!penv->sync_handle) { /* in a claiming launch: chunks run on any thread in any order, none can meet */
    fputs("lstm-export: a barrier inside a loop on the claiming pool (thread_pool.c): a kernel with a "
          "launch point must launch with a task count\n", stderr);
    abort();
  }
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

/* ---- The claiming pool: the generated code's parallel loops (num_task 0), which hold no barrier ----
 *
 * TVM's launch gives task i of n a fixed share and returns when all n tasks have returned, so one
 * task whose thread is off its core (another thread of the process computing, ONNX Runtime's pool
 * spinning after a run) holds up the call for a scheduler slice. Here the calling thread and
 * POOL_MAX - 1 at most workers claim the launch's chunks: CHUNKS per thread, thread r's own chunks
 * being r, r + n, r + 2n, ... (the same ones every call, so the same weights stay in its core's
 * cache), and a thread out of its own takes another's that nobody has started. The call returns
 * when every chunk is done, not when every worker has shown up: a worker that wakes late finds
 * nothing to take. One whose thread is preempted inside a chunk still holds the call up.
 *
 * Invariants: a chunk is claimed by one compare-and-swap on its thread's counter, tagged with the
 * launch's generation, so a worker still in an old launch can never take a chunk of a new one; the
 * job's fields are read after a successful claim, when the launch cannot end (that chunk is not
 * done) and so cannot be replaced. The lambda computes task `vid` of num_task = n * CHUNKS exactly
 * as TVM's launch would: the same chunks, the same arithmetic, the same bits, whoever runs them.
 * One launch at a time: a second thread's launch while the pool is busy runs on its own thread. */
#define POOL_MAX 64
#define CHUNKS 4
#define PAUSES 4000                  /* ~50 us of pause before a waiting worker starts to yield */
#define YIELD_NS 500                 /* then yields for TVM_THREAD_POOL_SPIN_COUNT x the time one sched_yield
                                        takes on an idle core (10000: ~5 ms, as TVM's pool), then sleeps */

typedef struct { unsigned long long next; char pad[56]; } chunk_counter; /* (generation << 32) | taken */
static chunk_counter counters[POOL_MAX] __attribute__((aligned(64)));
static struct {
  lstm_export_lambda f;
  void *cdata;
  int rc;
  int done __attribute__((aligned(64))); /* chunks finished */
} job;
static unsigned generation __attribute__((aligned(64))); /* the futex the workers sleep on */
static int sleepers, pool_n, pool_lock, stopping;
static long long idle_ns;
/* the workers, joined when the library is unloaded (their code goes with it); 0 in a forked child */
static pthread_t workers[POOL_MAX];
static int n_workers;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
/* 1 (set through ctypes, for benches): every claiming launch runs on the calling thread, as one task */
int lstm_export_one_task = 0;

#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define PAUSE() __asm__ __volatile__("yield")
#else
#define PAUSE() ((void)0)
#endif

static void futex_wait(unsigned *addr, unsigned seen) {
#ifdef SYS_futex
  syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
  (void)addr, (void)seen;
  sched_yield();
#endif
}

static void futex_wake_all(unsigned *addr) {
#ifdef SYS_futex
  syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
  (void)addr;
#endif
}

/* the next chunk for home thread `home` of launch `gen`, its own first; -1 when none is left */
static int claim(int home, unsigned gen) {
  int n = pool_n;
  for (int d = 0; d < n; ++d) {
    int r = (home + d) % n;
    unsigned long long w = __atomic_load_n(&counters[r].next, __ATOMIC_ACQUIRE);
    while ((unsigned)(w >> 32) == gen && (unsigned)w < CHUNKS)
      if (__atomic_compare_exchange_n(&counters[r].next, &w, w + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return r + (int)(unsigned)w * n;
  }
  return -1;
}

static void run_chunks(int home, unsigned gen) {
  int vid;
  while ((vid = claim(home, gen)) >= 0) {
    lstm_export_env env = {NULL, pool_n * CHUNKS};
    int rc = job.f(vid, &env, job.cdata); /* read after the claim: see the invariants */
    if (rc) STORE(job.rc, rc);
    __atomic_add_fetch(&job.done, 1, __ATOMIC_RELEASE);
  }
}

static void *worker(void *arg) {
  int home = (int)(intptr_t)arg;
  unsigned seen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
  for (;;) {
    unsigned gen;
    long long idle_since = 0;
    for (int i = 0; (gen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) == seen; ++i) {
      if (__atomic_load_n(&stopping, __ATOMIC_ACQUIRE)) return NULL;
      if (i < PAUSES) { PAUSE(); continue; }
      long long t = now_ns();
      if (!idle_since) idle_since = t;
      if (t - idle_since < idle_ns) { sched_yield(); continue; }
      __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&generation, __ATOMIC_SEQ_CST) == seen) futex_wait(&generation, seen);
      __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      idle_since = 0, i = 0;
    }
    seen = gen;
    if (__atomic_load_n(&stopping, __ATOMIC_ACQUIRE)) return NULL;
    run_chunks(home, gen);
  }
  return NULL;
}

/* a forked child has the calling thread alone: the workers were the parent's, and so may the lock be */
static void forked_child(void) {
  n_workers = 0;
  pool_n = 1;
  pool_lock = 0;
}

/* the pool's size as TVM's would be: TVM_NUM_THREADS as the constructor (or the user) set it, else
 * the user's OMP_NUM_THREADS (then the constructor leaves TVM_NUM_THREADS alone), at most POOL_MAX */
static void start_pool(void) {
  const char *env = getenv("TVM_NUM_THREADS");
  if (!env || atoi(env) <= 0) env = getenv("OMP_NUM_THREADS");
  int n = env && atoi(env) > 0 ? atoi(env) : lstm_export_cores;
  n = n > POOL_MAX ? POOL_MAX : n;
  const char *spin = getenv("TVM_THREAD_POOL_SPIN_COUNT");
  idle_ns = (spin ? atoll(spin) : atoll(SPIN_COUNT)) * YIELD_NS;
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay the application's threads' business */
  for (int r = 1; r < n; ++r) {
    if (pthread_create(&workers[n_workers], NULL, worker, (void *)(intptr_t)r) != 0) break;
    n_workers++;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  /* every home counts, its worker started or not: a home without one is taken by the others (the
   * caller at least), so a failed pthread_create costs speed, never a chunk */
  pool_n = n < 1 ? 1 : n;
  pthread_atfork(NULL, NULL, forked_child);
}

/* dlclose (TVM unloads a module it no longer holds) and exit: the workers run code of this library,
 * so they stop and are joined before it goes */
__attribute__((destructor)) static void stop_pool(void) {
  if (!n_workers) return;
  __atomic_store_n(&stopping, 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST);
  futex_wake_all(&generation);
  for (int i = 0; i < n_workers; ++i) pthread_join(workers[i], NULL);
  n_workers = 0;
}

static int claiming_launch(lstm_export_lambda f, void *cdata) {
  pthread_once(&pool_once, start_pool);
  if (pool_n == 1 || LOAD(lstm_export_one_task) || __atomic_exchange_n(&pool_lock, 1, __ATOMIC_ACQUIRE)) {
    lstm_export_env env = {NULL, 1}; /* alone: one task does every chunk */
    return f(0, &env, cdata);
  }
  unsigned gen = generation + 1; /* only the lock's holder writes it */
  job.f = f, job.cdata = cdata, job.rc = 0;
  __atomic_store_n(&job.done, 0, __ATOMIC_RELAXED);
  for (int r = 0; r < pool_n; ++r)
    __atomic_store_n(&counters[r].next, (unsigned long long)gen << 32, __ATOMIC_RELEASE);
  __atomic_store_n(&generation, gen, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST)) futex_wake_all(&generation);
  run_chunks(0, gen);
  for (int i = 0; __atomic_load_n(&job.done, __ATOMIC_ACQUIRE) < pool_n * CHUNKS; ++i) {
    if (i < PAUSES) PAUSE();
    else sched_yield(); /* a worker preempted inside a chunk: let it have this core if it is queued here */
  }
  int rc = job.rc;
  __atomic_store_n(&pool_lock, 0, __ATOMIC_RELEASE);
  return rc;
}

/* num_task 0 (a TIR parallel loop: the whole pool) or the tasks an extern kernel asks for */
int lstm_export_launch(lstm_export_lambda f, void *cdata, int num_task) {
  if (num_task == 1 || !LOAD(lstm_export_share_cores)) return TVMBackendParallelLaunch(f, cdata, num_task);
  if (num_task == 0) return claiming_launch(f, cdata); /* the generated code's loops: no barrier inside */
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
