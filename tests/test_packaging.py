"""Packaging: m2train is the only top-level import; every subpackage is installed; CLI entry points work."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_under_the_m2train_namespace():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(cfg["packages"])
    assert all(p == "m2train" or p.startswith("m2train.") for p in packages)
    mapped = cfg["package-dir"]
    assert mapped == {"m2train.kernels": "kernels", "m2train.data_prep": "data_prep", "m2train.launch": "launch"}
    on_disk = {"m2train." + ".".join(p.parent.relative_to(ROOT / "m2train").parts)
               for p in (ROOT / "m2train").rglob("__init__.py")}
    on_disk = {p.rstrip(".") for p in on_disk}
    on_disk |= {f"m2train.{name}" for name in mapped.values()}
    assert on_disk <= packages, f"not installed: {on_disk - packages}"


def test_namespace_packages_import():
    import m2train.data_prep
    import m2train.kernels
    import m2train.launch
    assert Path(m2train.kernels.__file__).parent == ROOT / "kernels"


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "m2train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart" in out.stdout and "model-summary" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "m2train", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
