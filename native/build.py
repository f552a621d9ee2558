"""cffi build script of the segment core (out-of-line API mode).

The declarations come from ``native/segvec.h`` itself, between ``/* SEGVEC_CDEF_BEGIN */`` and
``/* SEGVEC_CDEF_END */`` (``#`` lines dropped); ``set_source`` includes the same header, so the compiler
checks that the cdef and the code agree.  Run by the package build through ``cffi_modules``.
"""
import os
import pathlib

from cffi import FFI

NATIVE_DIR = pathlib.Path(__file__).resolve().parent
HEADER = NATIVE_DIR / "segvec.h"


def read_cdef(header_text: str) -> str:
    """Returns the header's declarations between the cdef markers, without preprocessor lines."""
    begin = header_text.index("/* SEGVEC_CDEF_BEGIN */") + len("/* SEGVEC_CDEF_BEGIN */")
    end = header_text.index("/* SEGVEC_CDEF_END */")
    lines = [line for line in header_text[begin:end].splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(read_cdef(HEADER.read_text()))

_debug = os.environ.get("SEGVEC_DEBUG_BUILD") == "1"
ffibuilder.set_source(
    "segvec._native",
    '#include "segvec.h"',
    sources=[os.path.relpath(NATIVE_DIR / "segvec.c")],
    include_dirs=[os.path.relpath(NATIVE_DIR)],
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    + (["-DSEGVEC_DEBUG", "-UNDEBUG", "-O1", "-g"] if _debug else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
