"""The ONNX frontend: TVM's ONNX importer with our converters (registry.py), which take one
ConvertOptions (convert_options.py); one module per op they convert (lstm.py; gru_rnn.py for GRU
and RNN; gather.py for the index-checked Gather family; flip.py for Slices that reverse whole
axes), the node parser the recurrent ops share (rnn_node.py), and the passes that make an
exporter's graph importable first (simplify.py folds shape arithmetic, open_dims.py names unnamed
and -1 input dims, slice_bounds.py clamps int64 extremes). It turns ONNX into Relax and calls down
into the kernels; it never builds or runs anything."""
