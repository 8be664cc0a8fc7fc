"""The kernels the converters emit: the fast fused CPU LSTM/GRU/RNN layer (cpu.py with its cells,
plan and weight packing), the portable time loops for symbolic shapes (recurrence.py, gru_rnn_loop.py),
the CUDA lowering (cuda.py), the default schedule of the generic kernels around them
(generic_schedule.py), the mark that tells our hand-scheduled kernels from TVM's (marks.py), and
reduced precision (lowp/: bf16 and int8 weights, a C kernel). Kernels know the target they are laid
out for, not the graph they sit in."""
