"""setuptools needs this file only for cffi's ``cffi_modules`` hook, which compiles ``native/``."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
