"""Builds the two C pieces: 64-bit atomics on a shared mapping (the shm transport's one-sided
verbs) and the fine-grained allocator's hot path (rallocator/_carver.c)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("rallocator._atomic", ["rallocator/_atomic.c"]),
                   Extension("rallocator._carver", ["rallocator/_carver.c"])])
