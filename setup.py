"""Build hook: compiles csrc/ into leafe_fast._C and maps kernels/ to leafe_fast.kernels.

Everything declarative lives in pyproject.toml; this file only exists because the pybind11
extension and the package-directory mapping need code.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).parent
sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))

ext = Pybind11Extension(
    "leafe_fast._C",
    sources,
    depends=headers,  # a header edit triggers a rebuild
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

packages = find_packages(include=["leafe_fast", "leafe_fast.*"]) + ["leafe_fast.kernels"]

setup(
    packages=packages,
    package_dir={"leafe_fast": "leafe_fast", "leafe_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
