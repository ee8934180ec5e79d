"""GPU test support. Under TRITON_INTERPRET=1 (CPU development), works around two Triton 3.6 interpreter
bugs: it calls int() on 1-element arrays, which numpy >= 2.4 refuses (loop bounds), and its float32 ->
float8 cast drops the carry when rounding up crosses a power of two (7.84 -> 4.0, not 8.0); float8 casts
from float32 go through torch's (round to nearest even, as the GPU's cvt.rn)."""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:  # no triton: the tests skip themselves
        _interpreter = None
    if _interpreter is not None and hasattr(_interpreter, "_patch_lang_tensor"):
        _original_patch = _interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _original_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interpreter._patch_lang_tensor = _patch_lang_tensor

        _original_convert_float = _interpreter._convert_float

        def _convert_float(data, input_dtype, output_dtype, rounding_mode):
            import numpy as np
            import torch
            import triton.language as tl

            if input_dtype == tl.float32 and output_dtype in (tl.float8e4nv, tl.float8e5):
                target = torch.float8_e4m3fn if output_dtype == tl.float8e4nv else torch.float8_e5m2
                values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
                return values.to(target).view(torch.uint8).numpy()
            return _original_convert_float(data, input_dtype, output_dtype, rounding_mode)

        _interpreter._convert_float = _convert_float
