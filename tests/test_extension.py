"""Whether abp._C is there: a missing extension is a clear message, and an error where it is required."""
import os

from abp import _ext


def test_extension_loads_or_says_why():
    if os.environ.get("ABP_REQUIRE_EXT") == "1":
        assert _ext.available(), f"ABP_REQUIRE_EXT=1 but abp._C did not load: {_ext.LOAD_ERROR}"
    if not _ext.available():
        assert _ext.LOAD_ERROR and _ext.LOAD_ERROR in _ext.describe()


def test_missing_extension_is_a_message_not_an_error():
    """Without abp._C, importing abp._ext warns with the reason and has_op says no (no exception)."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys, warnings
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "abp._C":
            raise ModuleNotFoundError("No module named 'abp._C'", name="abp._C")
sys.meta_path.insert(0, Hide())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from abp import _ext
assert not _ext.available() and not _ext.has_cuda()
ok, why = _ext.has_op("pack_mask", torch.device("cpu"))
assert not ok and "not built" in why, why
assert any(issubclass(w.category, _ext.ExtensionWarning) and "not built" in str(w.message) for w in caught)
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
