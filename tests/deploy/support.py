"""What the deploy checks compare against: the project's programs, flags, metrics, image paths.

Everything here is read from the code or the files themselves (the programs' --help, the
metrics registries, the Dockerfile), never from a list kept by hand.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client import CollectorRegistry

from pdp.ledger import BUDGETS
from pdp.metrics import PdpMetrics
from pep.metrics import PepMetrics
from tests.harness import BIN, ROOT

DEPLOY = ROOT / "deploy"
# Labels Prometheus adds to every scraped series; `le` comes with histogram buckets.
TARGET_LABELS = frozenset({"job", "instance"})


def tool(name: str) -> str:
    """A binary the deploy checks need: the venv's first, else PATH. Missing is a failure."""
    venv = BIN / name
    found = str(venv) if venv.exists() else shutil.which(name)
    assert found, f"{name} is not installed (make test installs it: scripts/system-tools.sh)"
    return found


def run(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ---- programs and their flags ------------------------------------------------------------


@functools.cache
def entry_points() -> frozenset[str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return frozenset(scripts)


@functools.cache
def help_text(*command: str) -> str:
    """``command --help``: a program of the venv, or ``python -m MODULE``."""
    if command[0] == "python":
        argv = [sys.executable, *command[1:]]
    else:
        assert command[0] in entry_points(), f"{command[0]} is not one of our programs"
        argv = [str(BIN / command[0]), *command[1:]]
    done = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert done.returncode == 0, f"{' '.join(command)} --help failed: {done.stderr}"
    return done.stdout


def flags_of(*command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(*command)))


def env_names_of(*command: str) -> set[str]:
    return set(re.findall(r"\bABC_[A-Z0-9_]+", help_text(*command)))


def option_value(args: list[str], flag: str) -> list[str]:
    """Every value of ``flag`` in an argument list, in ``--flag=value`` or ``--flag value`` form."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def check_invocation(argv: list[str]) -> list[str]:
    """Problems with one command line of ours: unknown program, subcommand or flag."""
    program, rest = argv[0], argv[1:]
    if program == "python":
        assert rest[:1] == ["-m"], f"python without -m: {argv}"
        module = rest[1]
        if not (ROOT / (module.replace(".", "/") + ".py")).exists():
            return [f"{module}: no such module in the project"]
        command, options = ("python", "-m", module), rest[2:]
    elif program in entry_points():
        words = [w for w in rest if not w.startswith("-")]
        command = (program,)
        # Subcommands (abcctl keygen, abcctl trust add): as deep as --help lists them.
        for word in words:
            if not re.search(rf"[{{,]{re.escape(word)}[,}}]", help_text(*command)):
                break
            command = (*command, word)
        options = rest
    else:
        return [f"{program}: not one of our programs"]
    known = flags_of(*command)
    return [
        f"{' '.join(command)}: no flag {flag}"
        for flag in (a.split("=", 1)[0] for a in options if a.startswith("--"))
        if flag not in known
    ]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/", 1)[0])


# ---- the image -------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(name.strip() or str(len(stages)), base.strip()))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def image_paths(target: str) -> dict[str, Path | None]:
    """Paths a final stage has, each with the project path it was copied from.

    ``None`` for what comes from another stage (the venv) or is made by WORKDIR or
    ``install -d``: only that exact path is known to exist, not what is under it.
    """
    stages = {s.name: s for s in dockerfile_stages()}
    paths: dict[str, Path | None] = {}
    stage: Stage | None = stages[target]
    while stage is not None:
        for copy in stage.arguments("COPY"):
            words = copy.split()
            from_stage = any(w.startswith("--from=") for w in words)
            sources = [w for w in words[:-1] if not w.startswith("--")]
            dest = words[-1].rstrip("/")
            paths[dest] = None if from_stage or len(sources) != 1 else ROOT / sources[0]
        paths.update(dict.fromkeys((w.rstrip("/") for w in stage.arguments("WORKDIR")), None))
        for script in stage.arguments("RUN"):
            for created in re.findall(r"install -d(?: -[ogm] \S+)* ((?:/\S+ ?)+)", script):
                paths.update(dict.fromkeys(created.split(), None))
        stage = stages.get(stage.base)
    return paths


def in_image(path: str, target: str) -> bool:
    """Whether ``path`` exists in the image built from stage ``target``."""
    for dest, source in image_paths(target).items():
        if path == dest:
            return True
        if source is not None and path.startswith(dest + "/"):
            return (source / path.removeprefix(dest + "/")).exists()
    return False


def under(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


# ---- metrics and PromQL ------------------------------------------------------------------


@functools.cache
def exported_series() -> dict[str, set[frozenset[tuple[str, str]]]]:
    """Every series name the PDP and the PEP expose, with the label sets of its series.

    Built from the code's own registries, as a scrape would show them: counters with
    `_total` (and `_created`), histograms with `_bucket`, `_sum` and `_count`. All labelled
    series exist from start-up; the budget gauge's appear once the PDP watches its runs.
    """
    series: dict[str, set[frozenset[tuple[str, str]]]] = {}
    pdp_registry, pep_registry = CollectorRegistry(), CollectorRegistry()
    PdpMetrics(pdp_registry).watch_budgets(lambda: dict.fromkeys(BUDGETS, 1.0))
    PepMetrics(pep_registry)
    for registry in (pdp_registry, pep_registry):
        for family in registry.collect():
            for sample in family.samples:
                series.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    return series


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def unknown_names(expr: str) -> list[str]:
    """Problems with the metrics and labels a PromQL expression names, against the code's."""
    exported = exported_series()
    problems = []
    labels_seen: set[str] = set(TARGET_LABELS)
    for selector in selectors(expr):
        name = selector.name
        if name is None or name not in exported:
            problems.append(f"metric {name!r} is not exported by the PDP or the PEP")
            continue
        label_sets = exported[name]
        labels = {label for labels in label_sets for label, _ in labels}
        labels_seen |= labels
        for matcher in selector.matchers.matchers:
            if matcher.name in TARGET_LABELS:
                continue
            if matcher.name not in labels:
                problems.append(f"{name} has no label {matcher.name!r}")
            elif matcher.op == promql_parser.MatchOp.Equal and not any(
                (matcher.name, matcher.value) in s for s in label_sets
            ):
                problems.append(f"{name} never has {matcher.name}={matcher.value!r}")

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            problems.extend(
                f"grouping by {label!r}, which no selected metric has"
                for label in node.modifier.labels
                if label not in labels_seen
            )

    promql_parser.walk(promql_parser.parse(expr), visit)
    return problems


def promtool_parse_problems(exprs: dict[str, str], tmp: Path) -> str:
    """Let Prometheus's own parser judge expressions: as recording rules for `promtool check`."""
    rules = [{"record": f"check:{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = tmp / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    done = run(tool("promtool"), "check", "rules", path)
    return "" if done.returncode == 0 else done.stdout + done.stderr
