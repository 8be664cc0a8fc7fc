"""What a build is for and where it runs: compile targets and the host's ISA (targets.py), the
thread pool linked into every llvm model.so (thread_pool.py and thread_pool.c: its size at load and
the claiming pool that shares the cores), and TVM's C++ log routed to Python's logging
(native_log.py). The ground floor of the compiler: it imports none of the rest."""
