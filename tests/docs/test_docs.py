"""The documentation stays true to the code: the generated references are current, the site builds with
`mkdocs build --strict` (a broken link or a page missing from the nav fails), every `updetr ...` command
in a fenced `bash` block of README.md and docs/ parses with the real CLI parser, and every YAML snippet of
an experiment or a sweep validates."""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(lang: str) -> list[tuple[Path, str]]:
    return [(page, m.group(2)) for page in PAGES for m in FENCE.finditer(page.read_text()) if m.group(1) == lang]


def updetr_commands(script: str) -> list[list[str]]:
    """The argv of each `updetr` call in a bash snippet: continuation lines joined, comments dropped,
    `&&` / `;` chains split, `.venv/bin/updetr` and `python -m updetr` recognised."""
    text = script.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for part in re.split(r"&&|;|\|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError as e:
                raise AssertionError(f"cannot split {part!r}: {e}") from None
            for i, w in enumerate(words):
                if w == "updetr" or w.endswith("/updetr"):
                    out.append(words[i + 1:])
                    break
                if w == "-m" and i + 1 < len(words) and words[i + 1] == "updetr":
                    out.append(words[i + 2:])
                    break
    return out


def test_generated_references_are_current():
    stale = gen_reference().stale()
    assert not stale, f"stale: {[str(p.relative_to(REPO)) for p in stale]}; run python scripts/gen_reference.py"


def test_config_reference_lists_every_field_of_every_section():
    from updetr.config import ExperimentConfig

    text = (REPO / "docs" / "reference" / "config.md").read_text()
    for section, field in ExperimentConfig.model_fields.items():
        assert f"| `{section}` |" in text
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            assert f"### `{section}`" in text
            for name in model.model_fields:
                assert f"| `{name}` |" in text, f"{section}.{name}"


@pytest.mark.timeout(300)
def test_site_builds_strict(tmp_path):
    try:
        import material  # noqa: F401  (mkdocs-material: the theme)
        import mkdocs  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{e.name} is not installed: pip install -e '.[docs]'")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=280, env={"NO_MKDOCS_2_WARNING": "1",
                                                                               "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def test_every_command_shown_parses():
    from updetr.cli import build_parser

    parser = build_parser()
    commands = [(page, argv) for page, script in blocks("bash") for argv in updetr_commands(script)]
    assert len(commands) > 30            # the docs do show commands (the extraction works)
    problems = []
    for page, argv in commands:
        shown = f"{page.relative_to(REPO)}: updetr {' '.join(argv)}"
        if argv in (["--version"], []):
            continue
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            problems.append(f"does not parse: {shown}")
            continue
        if getattr(args, "func", None) is None:
            problems.append(f"not a command: {shown}")
        elif [e for e in extra if e.startswith("-")]:
            problems.append(f"unknown flags: {shown}")
        elif extra and not isinstance(getattr(args, "overrides", None), list):
            problems.append(f"extra arguments {extra}: {shown}")
        else:
            problems += [f"argument {item!r} is not key=value: {shown}" for item in
                         list(getattr(args, "overrides", None) or []) + extra if "=" not in item]
    assert not problems, "\n".join(problems)


def test_every_yaml_snippet_validates(tmp_path):
    from updetr.config import ExperimentConfig, load_experiment
    from updetr.sweep.spec import SweepOptions, SweepSpec

    snippets = blocks("yaml")
    assert snippets
    experiment_keys = set(ExperimentConfig.model_fields) | {"stages", "base", "stage", "name"}
    for i, (page, text) in enumerate(snippets):
        where = f"{page.relative_to(REPO)} (yaml block {i})"
        data = yaml.safe_load(text)
        assert isinstance(data, dict), where
        if set(data) <= experiment_keys:
            path = tmp_path / f"snippet{i}.yaml"
            path.write_text(text)
            load_experiment(path)                      # ConfigError names the field
        elif "experiment" in data:
            SweepSpec.model_validate(data)
        elif set(data) == {"options"}:
            SweepOptions.model_validate(data["options"])
        else:
            raise AssertionError(f"{where}: neither an experiment nor a sweep: keys {sorted(data)}")


def test_readme_test_command_is_what_ci_runs():
    ci = next(ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv"))
    assert any(ci in script.splitlines() for _, script in blocks("bash") if _ == REPO / "README.md"), ci


def test_readme_links_and_picture_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"https?://", t)]
    assert local and all((REPO / t).exists() for t in local), [t for t in local if not (REPO / t).exists()]
