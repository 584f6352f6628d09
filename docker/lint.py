"""Project rules for the Dockerfiles and the Apptainer definition, beyond what hadolint checks.

    python docker/lint.py [--shellcheck PATH] docker/Dockerfile docker/Dockerfile.cpu \
        docker/apptainer.def

Dockerfiles: every base image, with ARG defaults filled in, has a tag other than `latest` (or a
digest); the final stage switches to a non-root USER before its ENTRYPOINT; every pip install
has --no-cache-dir; no apt-get upgrade; apt-get install has -y and --no-install-recommends and its
RUN removes /var/lib/apt/lists/*. Apptainer definitions: a Bootstrap and From header, and each
script section (%post, %environment, %runscript, %test, %startscript) passes `shellcheck -s sh`.
Prints one line per problem; exit status 1 if there is any.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_in_venv import BuildError, expand, instructions  # noqa: E402

SCRIPT_SECTIONS = {"post", "environment", "runscript", "test", "startscript"}


def check_dockerfile(path: Path) -> list[str]:
    problems: list[str] = []
    try:
        steps = instructions(path.read_text())
    except BuildError as exc:
        return [f"{path}: {exc}"]
    global_args: dict[str, str] = {}
    stage_names: set[str] = set()
    stages: list[list[tuple[int, str, str]]] = []
    for number, keyword, args in steps:
        if keyword == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key.strip()] = expand(default, global_args)
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            image = expand(words[0], global_args)
            if len(words) >= 3 and words[1].upper() == "AS":
                stage_names.add(words[2])
            if image not in stage_names and image != "scratch":
                name = image.split("@", 1)[0]
                tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
                if "@sha256:" not in image and tag in ("", "latest"):
                    problems.append(f"{path}:{number}: base image {image!r} is not pinned "
                                    "(give a version tag or a digest, not latest)")
            stages.append([])
            continue
        if stages:
            stages[-1].append((number, keyword, args))
        if keyword == "RUN":
            problems += check_run(path, number, args)
    if not stages:
        return problems + [f"{path}: no FROM"]
    user, entry_line = None, None
    for number, keyword, args in stages[-1]:
        if keyword == "USER":
            user = args.split(":", 1)[0].strip()
        if keyword == "ENTRYPOINT":
            entry_line = number
            if user is None or user in ("root", "0"):
                problems.append(f"{path}:{number}: ENTRYPOINT before a non-root USER")
    if entry_line is None:
        problems.append(f"{path}: the final stage has no ENTRYPOINT")
    if user is None or user in ("root", "0"):
        problems.append(f"{path}: the final stage runs as root (add a non-root USER)")
    return problems


def check_run(path: Path, number: int, args: str) -> list[str]:
    problems = []
    where = f"{path}:{number}"
    for command in re.split(r"&&|\|\||;", args):
        if re.search(r"\bpip3?\s+install\b|-m\s+pip\s+install\b", command) and \
                "--no-cache-dir" not in command:
            problems.append(f"{where}: pip install without --no-cache-dir")
        if re.search(r"\bapt(-get)?\s+(dist-)?upgrade\b", command):
            problems.append(f"{where}: apt-get upgrade (pin the base image instead)")
        if re.search(r"\bapt(-get)?\s+install\b", command):
            if "--no-install-recommends" not in command:
                problems.append(f"{where}: apt-get install without --no-install-recommends")
            if not re.search(r"\s(-y|--yes|-qq?y)\b", command):
                problems.append(f"{where}: apt-get install without -y")
            if "rm -rf /var/lib/apt/lists/*" not in args:
                problems.append(f"{where}: apt-get install without rm -rf /var/lib/apt/lists/*")
    return problems


def check_apptainer(path: Path, shellcheck: str) -> list[str]:
    problems: list[str] = []
    header: dict[str, str] = {}
    sections: dict[str, list[tuple[int, str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^%(\w+)", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append((number, line))
        elif re.match(r"^\s*(\w+)\s*:", line) and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip().lower()] = value.strip()
    for key in ("bootstrap", "from"):
        if not header.get(key):
            problems.append(f"{path}: no {key.capitalize()}: header")
    for name, lines in sections.items():
        if name not in SCRIPT_SECTIONS or not any(text.strip() for _, text in lines):
            continue
        first = lines[0][0]
        # Keep the line numbers: pad with blank lines up to the section's first line.
        body = "#!/bin/sh\n" + "\n" * (first - 2) + "\n".join(text for _, text in lines) + "\n"
        with tempfile.NamedTemporaryFile("w", suffix=f".{name}.sh", delete=False) as tmp:
            tmp.write(body)
        result = subprocess.run([shellcheck, "-s", "sh", "-f", "gcc", tmp.name],
                                capture_output=True, text=True)
        Path(tmp.name).unlink()
        for out in result.stdout.splitlines():
            problems.append(f"{path} (%{name}):{out.split(':', 1)[1]}")
        if result.returncode not in (0, 1):
            problems.append(f"{path} (%{name}): shellcheck failed: {result.stderr.strip()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--shellcheck", default="shellcheck")
    a = p.parse_args(argv)
    problems: list[str] = []
    for path in a.files:
        if path.suffix == ".def":
            problems += check_apptainer(path, a.shellcheck)
        else:
            problems += check_dockerfile(path)
    for line in problems:
        print(line)
    print(f"docker/lint.py: {len(a.files)} files, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
