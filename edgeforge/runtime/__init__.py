"""edgeforge's device-side runtime. Copied into every bundle; imports nothing from the compiler side.

Inside this package use relative imports only, and depend on numpy, tokenizers, jinja2 and the
backend runtime (TVM runtime or ONNX Runtime) alone.
"""
