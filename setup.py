"""Builds the one C piece: 64-bit atomics on a shared mapping (the shm transport's one-sided verbs)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("rallocator._atomic", ["rallocator/_atomic.c"])])
