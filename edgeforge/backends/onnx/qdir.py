"""The QDIR as the ONNX builder sees it: a thin adapter over edgeforge.runtime.weights.QdirWeights.

Only stored arrays are read (memory-mapped); nothing is dequantized or re-quantized here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EdgeforgeError
from ...quant.qdir import open_qdir
from ...runtime.bundle_errors import BundleError

MODEL_DTYPES = {"float32": np.float32, "float16": np.float16}


class QdirWeights:
    """config (dict), scheme, model_dtype (numpy dtype), entry(name) and arrays(name) of a QDIR."""

    def __init__(self, qdir: Path):
        self.qdir = Path(qdir)
        self._w = open_qdir(self.qdir)
        self.config = self._w.config
        self.scheme = self._w.scheme
        self.model_dtype_name = self._w.model_dtype
        if self.model_dtype_name not in MODEL_DTYPES:
            raise EdgeforgeError(f"{self.qdir / 'quantization.json'}: model_dtype '{self.model_dtype_name}' "
                                 f"is not one of {list(MODEL_DTYPES)}")
        self.model_dtype = MODEL_DTYPES[self.model_dtype_name]

    def has(self, name: str) -> bool:
        return name in self._w.tensors

    def entry(self, name: str) -> dict:
        try:
            return self._w.info(name)
        except BundleError as err:
            raise EdgeforgeError(str(err)) from None

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        try:
            return self._w.arrays(name)
        except BundleError as err:
            raise EdgeforgeError(str(err)) from None
