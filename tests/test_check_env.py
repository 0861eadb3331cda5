"""refimpl.check_env: requirement parsing, OK/FAIL per package, exit status, model check, environment lines."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types
from pathlib import Path

import torch

from refimpl import LlamaModel, ModelConfig
from refimpl import check_env as ce

ROOT = Path(__file__).resolve().parent.parent


def test_split_requirement_strings():
    assert ce._split("torch>=2.4") == ("torch", ">=2.4", None)
    assert ce._split("transformers>=5.0,<6") == ("transformers", ">=5.0,<6", None)
    assert ce._split('triton>=3.0; extra == "triton"') == ("triton", ">=3.0", "triton")
    assert ce._split("numpy") == ("numpy", "", None)
    assert ce._split("pkg[extra] >= 1.0 ; extra == 'dev'") == ("pkg", ">=1.0", "dev")


def test_requirements_come_from_pyproject():
    py, reqs = ce.read_requirements(ROOT / "pyproject.toml")
    assert py.startswith(">=3.")
    by_name = {n: (s, e) for n, s, e in reqs}
    for name in ("torch", "transformers", "datasets", "tokenizers", "safetensors", "matplotlib", "tqdm", "numpy"):
        assert by_name[name][1] is None, name  # base dependency: required
    assert by_name["triton"][1] == "triton"
    assert by_name["nbval"][1] == "dev" and by_name["jupyterlab"][1] == "dev"


def test_check_package_ok_missing_too_old_and_broken(monkeypatch):
    ok = ce.check_package("torch", ">=2.0")
    # the installed distribution's version (a CUDA build's torch.__version__ adds a local tag such as "+cu130")
    assert ok.ok and ok.detail == importlib.metadata.version("torch") and ok.line().startswith("[OK]")
    assert torch.__version__.startswith(ok.detail)
    missing = ce.check_package("kvcourse-no-such-package", ">=1", extra="dev")
    assert not missing.ok and "not installed" in missing.detail and "pip install -e '.[dev]'" in missing.detail
    assert missing.line().startswith("[FAIL]")
    old = ce.check_package("torch", ">=999")
    assert not old.ok and ">=999 is needed" in old.detail
    optional = ce.check_package("kvcourse-no-such-package", required=False)
    assert optional.line().startswith("[WARN]")

    real_import = ce.importlib.import_module

    def broken(name, *a, **k):
        if name == "tqdm":
            raise OSError("libfoo.so: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.setattr(ce.importlib, "import_module", broken)
    bad = ce.check_package("tqdm")
    assert not bad.ok and "`import tqdm` fails: OSError" in bad.detail


def test_python_check():
    assert ce.check_python(">=3.10").ok
    assert not ce.check_python(">=99").ok


def test_exit_status_only_for_required_failures():
    good = ce.Check("a", True, "1.0")
    _, code = ce.format_report([good, ce.Check("opt", False, "not installed", required=False)])
    assert code == 0
    text, code = ce.format_report([good, ce.Check("req", False, "not installed")])
    assert code == 1 and "RESULT: FAIL (1 required: req)" in text


def test_environment_lines(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KVCOURSE_DATA_DIR", str(tmp_path))
    lines = ce.env_report()
    assert "TRITON_INTERPRET='1'" in lines
    assert f"KVCOURSE_DATA_DIR={str(tmp_path)!r} (exists)" in lines
    monkeypatch.setenv("KVCOURSE_DATA_DIR", str(tmp_path / "nope"))
    assert any("MISSING" in line for line in ce.env_report())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET unset" in ce.env_report()
    cuda = [line for line in ce.torch_report() if line.startswith("torch CUDA")]
    assert cuda and ("not available" in cuda[0]) == (not torch.cuda.is_available())


def _fake_loading(monkeypatch, load_model):
    mod = types.ModuleType("refimpl.loading")
    mod.load_model = load_model
    monkeypatch.setitem(sys.modules, "refimpl.loading", mod)


def test_model_check_ok_and_fail(monkeypatch):
    class Tok:
        def encode(self, text):
            return [1, 2, 3]

    torch.manual_seed(0)
    tiny = LlamaModel(ModelConfig(vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2)).eval()
    _fake_loading(monkeypatch, lambda name: (tiny, Tok()))
    ok = ce.check_model("kvcourse-llama")
    assert ok.ok and "finite logits" in ok.detail

    def fails(name):
        raise FileNotFoundError(f"no model at models/{name}")

    _fake_loading(monkeypatch, fails)
    bad = ce.check_model("kvcourse-llama")
    assert not bad.ok and "kvcourse-llama does not load: FileNotFoundError" in bad.detail
    assert ce.format_report([bad])[1] == 1


def test_main_all_required_present(capsys):
    # every base dependency is installed in the course environment, so without the model check the status is 0
    assert ce.main(["--skip-model"]) == 0
    out = capsys.readouterr().out
    assert "[OK]   torch" in out and "RESULT: OK" in out and "course model" not in out


def test_wrapper_script_help():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_env.py"), "--help"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "--skip-model" in r.stdout
