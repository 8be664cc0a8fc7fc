"""Reduced precision, `compile --precision bf16|int8`: LSTM layers with bf16 or int8 weights and fp32
accumulation and state, run by a C kernel (bf16_lstm.c: AVX512-BF16, AMX, AVX-512 VNNI) that the
Relax graph calls (bf16_layer.py), its weights packed by bf16_pack.py, its engine and split chosen
per layer by bf16.py. (The bf16 names hold the int8 engine too; their renaming is part of #50.)"""
