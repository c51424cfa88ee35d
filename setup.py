"""The C kernels as an optional extension: built by ``pip install`` where a C compiler
works, skipped (with a warning from setuptools) where none does; gradflow then builds them
once into a per-user cache at first use, or falls back to torch operations. The metadata
lives in pyproject.toml."""

import runpy
from pathlib import Path

from setuptools import Extension, setup

here = Path(__file__).parent
build = runpy.run_path(str(here / "gradflow" / "kernels" / "_cbuild.py"))
source = f"gradflow/kernels/{build['SOURCE']}"  # setuptools wants it relative to this file

setup(
    ext_modules=[
        Extension(
            "gradflow.kernels._cpu",
            sources=[source],
            define_macros=[("GRADFLOW_EXTENSION", "1"), build["digest_macro"](here / source)],
            extra_compile_args=build["CFLAGS"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
