"""Summarises the ptxas reports (`-Xptxas -v`) that `make cuda-check` writes beside each object:
one line per kernel with its registers and spill bytes, per architecture. Exits non-zero when a
kernel held to no spills does (the attention forward and its split combine, the elementwise ops,
the quantized GEMV, the fused loss); the others' spills are listed.

    python cmake/ptxas_report.py build/cuda-check
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
HOT = ("fwd_mma", "combine", "rms_norm", "rope", "swiglu", "quant", "cross_entropy")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short(name: str) -> str:
    name = re.sub(r"\(.*\)$", "", name)  # parameters
    name = name.replace("exaone_ext::cuda::", "").replace("(anonymous namespace)::", "")
    return name.replace("exaone_ext::", "")


def parse(log: Path) -> list[tuple[str, str, int, int, int]]:
    rows, current = [], None
    for line in log.read_text().splitlines():
        if m := ENTRY.search(line):
            current = [m.group(1), m.group(2), 0, 0, 0]
        elif current and (m := SPILL.search(line)):
            current[3], current[4] = int(m.group(1)), int(m.group(2))
        elif current and (m := REGS.search(line)):
            current[2] = int(m.group(1))
            rows.append(tuple(current))
            current = None
    return rows


def main(root: str) -> int:
    rows = [r for log in sorted(Path(root).rglob("*.ptxas.log")) for r in parse(log)]
    if not rows:
        print(f"ptxas report: no reports under {root}")
        return 1
    names = demangle([r[0] for r in rows])
    width = max(len(short(n)) for n in names)
    bad = []
    for (mangled, arch, regs, st, ld), name in sorted(zip(rows, names), key=lambda x: (x[0][1], short(x[1]))):
        flag = ""
        if st or ld:
            flag = "  SPILLS"
            if any(h in name for h in HOT):
                bad.append(f"{arch} {short(name)}")
        print(f"{arch}  {short(name):<{width}}  {regs:3d} registers  spill {st}/{ld} bytes{flag}")
    spilling = sum(1 for r in rows if r[3] or r[4])
    print(f"ptxas report: {len(rows)} kernels, {spilling} with spills ({len(bad)} of them held to none)")
    if bad:
        print("kernels held to no spills that spill:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/cuda-check"))
