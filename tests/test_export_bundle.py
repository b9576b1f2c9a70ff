"""The export bundler derives its module list from modeling.py's relative imports and refuses what it could not
bundle correctly: a relative import inside a function, an import cycle, two modules defining one name."""

import pytest

from dmc import export
from dmc.export import ExportError, bundle, modeling_modules


def _package(tmp_path, monkeypatch, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(export, "PACKAGE", tmp_path)


def test_the_real_bundle_puts_every_module_after_what_it_imports():
    order = modeling_modules()
    assert order[-1] == "modeling.py" and "config.py" not in order
    for i, rel in enumerate(order):
        assert set(export._relative_imports(rel)) - {"config.py"} <= set(order[:i]), rel
    assert {"cache.py", "metrics.py", "ops/decode_attention.py", "ops/triton_decode.py"} <= set(order)


def test_dependencies_come_first_and_the_shapes_it_cannot_bundle_are_refused(tmp_path, monkeypatch):
    _package(tmp_path, monkeypatch, {
        "modeling.py": "from .ops.b import g\nfrom .a import f\nfrom .config import C\n",
        "a.py": "from .ops.b import g\ndef f(): return g()\n",
        "ops/b.py": "def g(): return 1\n",
        "config.py": "class C: pass\n",
    })
    assert modeling_modules() == ["ops/b.py", "a.py", "modeling.py"]
    (tmp_path / "a.py").write_text("def f():\n    from .ops.b import g\n    return g()\n")
    with pytest.raises(ExportError, match="a.py:2 has a relative import inside a function"):
        modeling_modules()
    (tmp_path / "a.py").write_text("from .modeling import x\n")
    with pytest.raises(ExportError, match="import cycle modeling.py -> a.py -> modeling.py"):
        modeling_modules()
    (tmp_path / "a.py").write_text("def g(): return 2\n")
    with pytest.raises(ExportError, match="'g' is defined in both"):
        bundle(["ops/b.py", "a.py"], "header")
