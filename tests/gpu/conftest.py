"""GPU test support. Under TRITON_INTERPRET=1 (CPU development), works around the Triton 3.6
interpreter calling int() on 1-element arrays, which numpy >= 2.4 refuses (loop bounds)."""
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
