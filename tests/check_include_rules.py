#!/usr/bin/env python3
"""The layering rules of docs/architecture.md, checked on every project #include:

  parallel/              includes parallel/ only (plus std, ATen/c10/torch, MPI, NCCL)
  moe/                   includes moe/ and parallel/
  trainer/common/        includes trainer/common/ only
  trainer/config/        includes trainer/common/, trainer/config/ and moe/moe_config.hpp
  trainer/<part>/        includes moe/, parallel/ and trainer/<part>/ folders, never the
                         trainer/ root files (the loop, metrics, CLI, device)
  trainer/ root, tests/, bench/: anything

Exit status 1 with one line per violation (file:line: the include and the rule it breaks).
"""
import pathlib
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
PROJECT_DIRS = ("parallel/", "moe/", "trainer/")


def allowed(source: str, target: str) -> str | None:
    """None when `source` may include `target`; otherwise the rule it breaks."""
    if source.startswith("parallel/"):
        return None if target.startswith("parallel/") else "parallel/ includes only parallel/"
    if source.startswith("moe/"):
        ok = target.startswith(("moe/", "parallel/"))
        return None if ok else "moe/ includes only moe/ and parallel/"
    if source.startswith("trainer/common/"):
        ok = target.startswith("trainer/common/")
        return None if ok else "trainer/common/ includes only trainer/common/"
    if source.startswith("trainer/config/"):
        ok = target.startswith(("trainer/common/", "trainer/config/")) or target == "moe/moe_config.hpp"
        return None if ok else "trainer/config/ is torch-free: trainer/common/, trainer/config/, moe/moe_config.hpp"
    parts = source.split("/")
    if source.startswith("trainer/") and len(parts) > 2:
        if target.startswith("trainer/") and len(target.split("/")) == 2:
            return "trainer/<part>/ never includes the trainer/ root files"
    return None


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    violations = []
    for folder in PROJECT_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in (".hpp", ".cpp", ".h", ".cu", ".cuh"):
                continue
            source = path.relative_to(root).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = INCLUDE.match(line)
                if not match or not match.group(1).startswith(PROJECT_DIRS):
                    continue
                rule = allowed(source, match.group(1))
                if rule:
                    violations.append(f'{source}:{number}: #include "{match.group(1)}": {rule}')
    for violation in violations:
        print(violation)
    print(f"include rules: {len(violations)} violation(s)")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
