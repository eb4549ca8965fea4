"""Declares the Cython extensions only; all other metadata is in pyproject.toml."""

from setuptools import setup

# The native hot path (native/*.pyx -> agent._*_c) arrives with the native-transport work;
# until then every module is pure Python and this list is empty on purpose.
EXTENSIONS: list[object] = []

setup(ext_modules=EXTENSIONS)
