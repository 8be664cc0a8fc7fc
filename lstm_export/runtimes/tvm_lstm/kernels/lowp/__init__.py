"""Reduced precision, `compile --precision bf16|int8`: LSTM layers with bf16 or int8 weights and fp32
accumulation and state, run by a C kernel (lowp_lstm.c: AVX512-BF16, AMX, AVX-512 VNNI) that the
Relax graph calls (layer.py), its weights packed by pack.py, each layer's engine and split chosen by
engine.py. The kernel's symbol and the PrimFuncs that call it keep their bf16 names
(lstm_export_bf16_layer, lstm_layer_bf16_fwd): they are names inside every artifact compiled so far."""
