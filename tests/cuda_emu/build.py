"""Builds the CUDA sources of spconv_lite (src/cuda/*.cu) as a CPU library that emulates CUDA.

The sources are rewritten (kernel launches -> emu::launch, which refuses the configurations a
GPU refuses; ``__launch_bounds__`` -> a check of the block size in the kernel's body;
``__shared__`` variables registered, to be refilled at every block's start; ``at::empty`` ->
a tensor filled with bytes, as a GPU's reused memory is; casts to
vector types -> emu::aligned_cast, which checks their alignment; registrations -> a separate
``spconv_lite_emu`` op namespace on the CPU key), compiled with g++ against the stub headers in
``include/`` and the shim ``emu.h``, and loaded with ``torch.ops.load_library``. The emulated
ops are then ``torch.ops.spconv_lite_emu.*`` with the schemas of ``torch.ops.spconv_lite.*``.

Usage: ``python tests/cuda_emu/build.py`` builds (cached by torch.utils.cpp_extension in
``build/cuda_emu``) and prints the library path; tests call :func:`load`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NAME = "spconv_lite_emu"


def _closing(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} at {start}")


def _kernel_name_start(text: str, end: int) -> int:
    """Start of the kernel expression (name with template arguments) ending at ``end``."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    """``kernel<<<config>>>(args)`` -> ``::emu::launch(kernel, config)(args)``."""
    while (pos := text.find("<<<")) >= 0:
        close = text.index(">>>", pos)
        config = text[pos + 3:close]
        paren = close + 3
        while text[paren].isspace():
            paren += 1
        assert text[paren] == "(", text[pos - 80:paren + 20]
        args_end = _closing(text, paren, "(", ")")
        start = _kernel_name_start(text, pos)
        kernel = text[start:pos].strip()
        text = (text[:start] + f"::emu::launch({kernel}, {config})" + text[paren:args_end]
                + text[args_end:])
    return text


def rewrite_launch_bounds(text: str) -> str:
    """``__launch_bounds__(n) kernel(params) {`` -> ``kernel(params) {
    ::emu::check_launch_bounds(n);``: a GPU refuses to launch such a kernel with more than n
    threads a block."""
    while (pos := text.find("__launch_bounds__(")) >= 0:
        bound_end = _closing(text, pos + len("__launch_bounds__"), "(", ")")
        bound = text[pos + len("__launch_bounds__("):bound_end - 1]
        params_end = _closing(text, text.index("(", bound_end), "(", ")")
        body = text.index("{", params_end) + 1
        text = (text[:pos] + text[bound_end:body] + f" ::emu::check_launch_bounds({bound});"
                + text[body:])
    return text


SHARED_DECLARATION = re.compile(r"(?<!extern )__shared__\b")


def register_shared_variables(text: str) -> str:
    """``__shared__ T name[...];`` -> the same and ``EMU_REGISTER_SHARED(name);``: the emulation
    refills each kernel's static shared memory at every block's start, as the dynamic one."""
    out, pos = [], 0
    for match in SHARED_DECLARATION.finditer(text):
        end = text.index(";", match.end()) + 1
        declaration = text[match.end():end]
        name = re.search(r"(\w+)\s*(?:\[|;|=)", declaration).group(1)
        out += [text[pos:end], f" EMU_REGISTER_SHARED({name});"]
        pos = end
    return "".join(out) + text[pos:]


# Casts to CUDA's vector types, whose accesses must be aligned to their size on a GPU.
VECTOR_CAST = re.compile(r"reinterpret_cast<(\s*(?:const\s+)?(?:u?int[24]|float[24]|__half2|"
                         r"__nv_bfloat162)\s*\*)>\(")


def rewrite(source: Path) -> str:
    text = source.read_text()
    text = rewrite_launches(text)
    text = rewrite_launch_bounds(text)
    text = register_shared_variables(text)
    text = re.sub(r"\bat::empty(_like)?\(", r"::emu::empty\1(", text)  # include/emu_memory.h
    text = VECTOR_CAST.sub(r"::emu::aligned_cast<\1>(", text)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(spconv_lite,\s*CUDA,", f"TORCH_LIBRARY_IMPL({NAME}, CPU,",
                  text)
    text = text.replace("TORCH_LIBRARY(spconv_lite,", f"TORCH_LIBRARY({NAME},")
    text = text.replace("PyInit__C", f"PyInit__{NAME}")
    return f'#line 1 "{source}"\n' + text


def load_library() -> None:
    """Builds (or reuses) the emulation library and loads it."""
    import spconv_lite  # noqa: F401  (the CPU ops, which the error paths re-run)

    sanitize = os.environ.get("SPCONV_LITE_EMU_SANITIZE", "")  # "address", "thread"
    out = REPO / "build" / ("cuda_emu" + (f"_{sanitize}" if sanitize else ""))
    sources_dir = out / "sources"
    headers_dir = out / "include"  # rewritten CUDA headers, searched before include/
    sources = []
    rewritten = [(s, sources_dir / (s.stem + ".cpp"))
                 for s in [REPO / "src" / "registration.cpp",
                           *sorted((REPO / "src" / "cuda").glob("*.cu"))]]
    rewritten += [(h, headers_dir / h.relative_to(REPO / "include"))
                  for h in sorted((REPO / "include").rglob("*.cuh"))]
    for source, target in rewritten:
        target.parent.mkdir(parents=True, exist_ok=True)
        text = rewrite(source)
        if not target.exists() or target.read_text() != text:  # keep ninja's cache valid
            target.write_text(text)
        if target.suffix == ".cpp":
            sources.append(str(target))
    # The compilers must not run under a sanitizer's runtime that the test process preloads
    # (ThreadSanitizer's: scripts/emu_race_check.sh); g++ crashes under it.
    preload = os.environ.pop("LD_PRELOAD", None)
    # -O2 vectorises the emulated WMMA products (a third of a tile test's time at -O1); a
    # sanitizer's reports read better at -O1.
    optimize = "-O1" if sanitize else "-O2"
    try:
        load(
            name=NAME,
            sources=sources,
            extra_include_paths=[str(headers_dir), str(HERE / "include"), str(REPO / "include")],
            extra_cflags=[optimize, "-g", "-std=c++20", "-include", str(HERE / "emu.h"),
                          "-include", str(HERE / "include" / "emu_memory.h"),
                          "-DSPCONV_LITE_CUDA_EMULATION=1", "-Wno-unused-variable"]
            + ([f"-fsanitize={sanitize}"] if sanitize else []),
            extra_ldflags=[f"-fsanitize={sanitize}"] if sanitize else [],
            build_directory=str(out),
            is_python_module=False,
            verbose=False,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


if __name__ == "__main__":
    load_library()
    print("loaded", [name for name in dir(torch.ops.spconv_lite_emu)][:20])
