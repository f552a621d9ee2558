"""cffi build script of the segment core (out-of-line API mode).

The declarations come from the headers themselves: ``native/segvec.h`` between ``/* SEGVEC_CDEF_BEGIN */``
and ``/* SEGVEC_CDEF_END */``, and ``native/segvec_env.h`` (envs written in C) between its own markers
(``#`` lines dropped); ``set_source`` includes the same headers, so the compiler checks that the cdef and
the code agree.  The module also holds the C envs built into segvec (``native/envs/``).  Run by the package
build through ``cffi_modules``.
"""
import os
import pathlib

from cffi import FFI

NATIVE_DIR = pathlib.Path(__file__).resolve().parent
HEADER = NATIVE_DIR / "segvec.h"
ENV_HEADER = NATIVE_DIR / "segvec_env.h"
SOURCES = [NATIVE_DIR / "segvec.c", NATIVE_DIR / "segvec_env.c", NATIVE_DIR / "envs" / "cartpole.c",
           NATIVE_DIR / "envs" / "synthetic_atari.c"]


def read_cdef(header_text: str, marker: str = "SEGVEC_CDEF") -> str:
    """Returns the header's declarations between the `marker` cdef markers, without preprocessor lines."""
    begin = header_text.index(f"/* {marker}_BEGIN */") + len(f"/* {marker}_BEGIN */")
    end = header_text.index(f"/* {marker}_END */")
    lines = [line for line in header_text[begin:end].splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef("\n".join([read_cdef(HEADER.read_text()), read_cdef(ENV_HEADER.read_text(), "SEGVEC_ENV_CDEF"),
                           read_cdef(ENV_HEADER.read_text(), "SEGVEC_ENV_CORE_CDEF")]))

_debug = os.environ.get("SEGVEC_DEBUG_BUILD") == "1"
ffibuilder.set_source(
    "segvec._native",
    '#include "segvec.h"\n#include "segvec_env.h"',
    sources=[os.path.relpath(source) for source in SOURCES],
    include_dirs=[os.path.relpath(NATIVE_DIR)],
    # -ffp-contract=off: no fused multiply-adds, so C envs compute what their numpy originals compute
    extra_compile_args=["-std=c11", "-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    + (["-DSEGVEC_DEBUG", "-UNDEBUG", "-O1", "-g"] if _debug else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
