import importlib
import os
import subprocess
import sys

import pytest
import torch

import exaone_ext


def test_build_info_describes_the_build():
    info = exaone_ext.build_info()
    assert info["version"] == exaone_ext.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert "scalar" in info["cpu_isa_compiled"]
    assert info["cpu_isa"] in info["cpu_isa_compiled"]
    assert info["cpu_isa_best"] in info["cpu_isa_compiled"]
    assert isinstance(info["cpu_features"], list)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_cpu_isa_can_be_lowered_but_not_raised():
    best = exaone_ext.build_info()["cpu_isa_best"]
    before = exaone_ext.get_cpu_isa()  # EXAONE_EXT_CPU_ISA may have lowered it for the whole run
    try:
        exaone_ext.set_cpu_isa("scalar")
        assert exaone_ext.get_cpu_isa() == "scalar"
        exaone_ext.set_cpu_isa("auto")
        assert exaone_ext.get_cpu_isa() == best
        with pytest.raises(ValueError, match="must be one of"):
            exaone_ext.set_cpu_isa("sse9")
        if best != "avx512":
            with pytest.raises(ValueError, match="not available"):
                exaone_ext.set_cpu_isa("avx512")
    finally:
        exaone_ext.set_cpu_isa(before)
    assert exaone_ext.get_cpu_isa() == before


def test_environment_variable_lowers_the_variant():
    code = "import exaone_ext; print(exaone_ext.get_cpu_isa())"
    env = {**os.environ, "EXAONE_EXT_CPU_ISA": "scalar"}  # the rest as the user has it (HOME, LD_LIBRARY_PATH, ...)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["EXAONE_EXT_CPU_ISA"] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0, "an unknown EXAONE_EXT_CPU_ISA must fail loudly"


def test_torch_version_mismatch_is_a_clear_import_error(monkeypatch):
    config = importlib.import_module("exaone_ext._build_config")
    monkeypatch.setattr(config, "TORCH_VERSION", "1.0.0")
    from exaone_ext import _loader
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .*Rebuild"):
        _loader.load_extension()


def test_every_op_has_a_cpu_kernel_and_a_fake_and_forward_ops_have_autograd():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("exaone_ext::")]
    assert "exaone_ext::swiglu" in names
    for n in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"), f"{n} has no CPU kernel"
        entry = torch._library.simple_registry.singleton.find(n)
        assert entry.fake_impl.kernel is not None, f"{n} has no fake (meta) implementation"
        if not any(s in n for s in ("backward", "_bwd", "kvcache", "cos_sin", "decode_layers")):   # inference only
            assert torch._C._dispatch_has_kernel_for_dispatch_key(n, "Autograd"), f"{n} has no autograd formula"
