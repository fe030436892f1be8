"""The kernels/ folder installs as `nanoft.kernels`, never as a top-level `kernels` package: that name
belongs to Hugging Face's kernel hub, which bitsandbytes imports."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_puts_kernels_under_nanoft_only(tmp_path):
    # built from a copy of the sources: setuptools builds in the tree's build/, where an old build's files
    # (a module since renamed) would go into the wheel, and a second run in the same checkout would collide
    src = tmp_path / "src"
    for folder in ("nanoft", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("nanoft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nanoft/kernels/nf4.py" in names and "nanoft/kernels/__init__.py" in names
    assert "nanoft/optim/adamw8bit.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    sources = {f"nanoft/{f.relative_to(ROOT / 'nanoft')}" for f in (ROOT / "nanoft").rglob("*.py")}
    sources |= {f"nanoft/kernels/{f.relative_to(ROOT / 'kernels')}" for f in (ROOT / "kernels").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == sources  # every module, and nothing else
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["nanoft"]


def test_installed_package_imports_kernels_by_its_nanoft_name(tmp_path):
    # from outside the checkout, so the repo root is not on sys.path
    code = "import nanoft.kernels, importlib.util; print(nanoft.kernels.quantize_nf4.__module__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "nanoft.kernels.nf4"
