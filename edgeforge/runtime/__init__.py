"""edgeforge's device-side runtime. Copied into every bundle; imports nothing from the compiler side.

Inside this package use relative imports only, and depend on tokenizers, jinja2 and the backend
runtime (TVM runtime + tvm_ffi, or ONNX Runtime) alone; numpy for ONNX (its engine feeds ONNX
Runtime numpy arrays), for generate/sampling, and wherever it is installed, but never on the TVM
smoke path: a TVM bundle's device does not install it (tvm_engine.py, golden_check.py).
"""
