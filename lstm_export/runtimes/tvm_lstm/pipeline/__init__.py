"""The compile pipeline: `compile` as named stages over one CompileOptions (options.py), in
compile.py (prepare the graph, set the kernels up, import, tune, choose the plan, build, write the
artifact), the import and build stages themselves (importer.py, builder.py), measured plan
selection (plan_select.py), MetaSchedule tuning and its committed databases (tuning.py, tuning_db/),
the compile cache behind `--runtime tvm-llvm|tvm-cuda` (cache.py, keyed by the compiler's source
digest, source_digest.py) and the --input-shape hint for models with symbolic dims (shape_hint.py).
It drives the frontend and the kernels for a target; nothing below imports it."""
