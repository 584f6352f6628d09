"""Run one stage of a Dockerfile on this machine, without a container engine.

    python docker/build_in_venv.py docker/Dockerfile.cpu --target build --root /tmp/x/root \
        --build-arg VENV=/tmp/x/venv [--build-arg KEY=VALUE ...] [--keep-no-cache-dir]

Enough of the Dockerfile language for the images' build stages, interpreted the way a builder
would: ARG (global ones before the first FROM, and per stage), ENV, WORKDIR, COPY from the build
context (the repository root; `--from` is refused) and RUN (shell form through /bin/sh -c, or
exec form). Absolute WORKDIR and COPY destinations are placed under --root; everything else must
come from ARG/ENV values, which --build-arg overrides as `docker build --build-arg` does (the
images keep their virtual environment in ARG VENV for that reason). RUN steps see this machine's
environment plus the stage's ARG and ENV values, so `python` and `pip` are the stage's venv once
its ENV puts it first on PATH.

The one rewrite: `--no-cache-dir` is dropped from RUN steps (unless --keep-no-cache-dir) so that
repeated CI runs reuse pip's cache; every step is printed as it is run.
LABEL, USER, EXPOSE, ENTRYPOINT, CMD and the like do nothing here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

IGNORED = {"LABEL", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "VOLUME", "STOPSIGNAL", "HEALTHCHECK",
           "SHELL", "ONBUILD", "MAINTAINER"}
_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-+])(?P<word>[^}]*))?\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class BuildError(Exception):
    pass


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, KEYWORD, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (and parser directives), also inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, rest = joined.partition(" ")
        if "<<" in rest and keyword.upper() in {"RUN", "COPY"}:
            raise BuildError(f"line {start}: heredocs are not supported")
        out.append((start, keyword.upper(), rest.strip()))
    if pending:
        raise BuildError("the Dockerfile ends inside a continued instruction")
    return out


def expand(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("plain")
        current = env.get(name, "")
        op = m.group("op")
        if op == ":-":
            return current or expand(m.group("word"), env)
        if op == ":+":
            return expand(m.group("word"), env) if current else ""
        return current

    return _VAR.sub(sub, value)


def assignments(args: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """`K=V K2="v 2"` (or the legacy `K V`), values expanded."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return [(words[0], expand(" ".join(words[1:]), env))]
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise BuildError(f"cannot parse {args!r}")
        pairs.append((key, expand(value, env)))
    return pairs


class Ignore:
    """The patterns of a .dockerignore file (no `!` exceptions), as the builder reads them."""

    def __init__(self, path: Path | None):
        self.patterns: list[str] = []
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    if line.startswith("!"):
                        raise BuildError(f"{path}: `!` exceptions are not supported")
                    self.patterns.append(line.strip("/"))

    def __call__(self, rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in self.patterns:
            for prefix in prefixes:
                if fnmatch.fnmatchcase(prefix, pattern):
                    return True
                if pattern.startswith("**/") and fnmatch.fnmatchcase(
                        prefix.rsplit("/", 1)[-1], pattern[3:]):
                    return True
        return False


class Stage:
    def __init__(self, root: Path, context: Path, ignore: Ignore, keep_no_cache: bool):
        self.root, self.context, self.ignore = root, context, ignore
        self.keep_no_cache = keep_no_cache
        self.env: dict[str, str] = {}  # ARG and ENV values of the stage
        self.cwd = root

    def place(self, path: str) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else self.cwd / path

    def workdir(self, args: str) -> None:
        self.cwd = self.place(expand(args, self.env))
        self.cwd.mkdir(parents=True, exist_ok=True)

    def copy(self, args: str) -> None:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            raise BuildError("COPY --from is not supported")
        *sources, dest = [expand(w, self.env) for w in words]
        target = self.place(dest)
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            src = (self.context / source).resolve()
            if self.context.resolve() not in (src, *src.parents) or not src.exists():
                raise BuildError(f"COPY source {source} is not in the build context")
            if src.is_dir():
                self._copy_tree(src, target)
            else:
                out = target / src.name if into_dir else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)

    def _copy_tree(self, src: Path, target: Path) -> None:
        base = self.context.resolve()
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(base).as_posix()
            if self.ignore(rel) or not path.is_file():
                continue
            out = target / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)

    def run(self, args: str) -> None:
        if args.startswith("--"):
            raise BuildError(f"RUN flags are not supported: {args.split()[0]}")
        if args.startswith("["):
            argv = json.loads(args)
        else:
            if not self.keep_no_cache:
                args = re.sub(r"\s--no-cache-dir\b", "", args)
            argv = ["/bin/sh", "-c", args]
        print(f"== RUN {args}", flush=True)
        env = {**os.environ, **self.env}
        rc = subprocess.run(argv, cwd=self.cwd, env=env).returncode
        if rc != 0:
            raise BuildError(f"RUN exited with {rc}: {args}")


def build(dockerfile: Path, target: str, root: Path, context: Path,
          build_args: dict[str, str], keep_no_cache: bool) -> None:
    steps = instructions(dockerfile.read_text())
    global_args: dict[str, str] = {}
    ignore = Ignore(Path(f"{dockerfile}.dockerignore"))
    stage: Stage | None = None
    found = False
    for number, keyword, args in steps:
        if keyword == "FROM":
            name = args.split()[-1] if re.search(r"\s+AS\s+", args, re.I) else ""
            if found:
                break  # the target stage ended
            if name == target:
                found = True
                stage = Stage(root, context, ignore, keep_no_cache)
                print(f"== stage {target} (FROM {expand(args, global_args)}), "
                      f"root {root}", flush=True)
            continue
        if keyword == "ARG":
            key, sep, default = args.partition("=")
            key = key.strip()
            if stage is None and not found:
                global_args[key] = build_args.get(key, expand(default, global_args))
            elif stage is not None:
                value = build_args.get(key) if key in build_args else (
                    expand(default, stage.env) if sep else global_args.get(key, ""))
                stage.env[key] = value
            continue
        if stage is None:
            continue  # another stage's instructions
        try:
            if keyword == "ENV":
                for key, value in assignments(args, {**os.environ, **stage.env}):
                    stage.env[key] = value
            elif keyword == "WORKDIR":
                stage.workdir(args)
            elif keyword in {"COPY", "ADD"}:
                if keyword == "ADD":
                    raise BuildError("ADD is not supported (use COPY)")
                stage.copy(args)
            elif keyword == "RUN":
                stage.run(args)
            elif keyword not in IGNORED:
                raise BuildError(f"unknown instruction {keyword}")
        except BuildError as exc:
            raise BuildError(f"{dockerfile}:{number}: {exc}") from None
    if not found:
        raise BuildError(f"{dockerfile}: no stage named {target!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dockerfile", type=Path)
    p.add_argument("--target", required=True, help="the stage to run (FROM ... AS NAME)")
    p.add_argument("--root", type=Path, required=True, help="stands for the image's /")
    p.add_argument("--context", type=Path, default=Path("."), help="build context (default .)")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep-no-cache-dir", action="store_true")
    a = p.parse_args(argv)
    build_args = dict(kv.split("=", 1) for kv in a.build_arg)
    try:
        build(a.dockerfile, a.target, a.root.resolve(), a.context, build_args,
              a.keep_no_cache_dir)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
