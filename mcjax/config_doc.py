"""The config reference, read from `mcjax/config.py` itself, so it cannot drift from the code.

Every section is a dataclass of config.py, every key one of its fields: its type and default
come from the dataclass, its meaning from the comments written beside it (`# ...` on the
field's line) and right above it (a block of `#` lines with no blank line in between),
read from the source with `ast` and `tokenize`; a section's docstring introduces it. Two
outputs:

- `markdown()`: docs/config.md (`python -m mcjax.config_doc docs/config.md` rewrites it;
  tests/test_docs.py fails while the file and the code disagree);
- `commented_yaml(cfg)`: a resolved config as YAML, each key with its comment
  (`mcjax config --config FILE [key.path=value ...]`); it loads back to the same config.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml

from mcjax import config as config_module
from mcjax.config import Config

REGENERATE = "python -m mcjax.config_doc docs/config.md"


@dataclasses.dataclass(frozen=True)
class Comment:
    above: tuple[str, ...]  # the comment lines right above the field, without '#'
    inline: str  # the comment on the field's own (last) line, without '#'

    @property
    def text(self) -> str:
        return " ".join([*self.above, self.inline]).strip()


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    type: Any  # the resolved annotation (typing object)
    default: Any  # the default value, or dataclasses.MISSING for a required key
    comment: Comment


@dataclasses.dataclass(frozen=True)
class Section:
    path: str  # "" for the top level; "dataset.splits.<split>" for each split
    cls: type
    keys: tuple[Key, ...]


# ----------------------------------------------------------------------------- reading config.py


def _comments(source: str) -> dict[int, str]:
    """Line number → the text of the comment on that line (without '#', stripped)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_comments(cls: type) -> dict[str, Comment]:
    """Each field of dataclass `cls` → the comments written beside and right above it, read
    from the source of the module that defines it."""
    source = inspect.getsource(sys.modules[cls.__module__])
    lines = source.splitlines()
    comments = _comments(source)
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        out[stmt.target.id] = Comment(tuple(above), comments.get(stmt.end_lineno, ""))
    return out


def _keys(cls: type) -> tuple[Key, ...]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "source_file":  # where the config was read from, not a key
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        keys.append(Key(f.name, hints[f.name], default, comments.get(f.name, Comment((), ""))))
    return tuple(keys)


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section key (a dataclass, or dict[str, dataclass]), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
        return typing.get_args(tp)[1]
    return None


def sections() -> list[Section]:
    """Every section of `Config`, depth first, in the order of the fields."""
    out = []

    def walk(cls: type, path: str) -> None:
        keys = _keys(cls)
        out.append(Section(path, cls, keys))
        for key in keys:
            sub = _section_class(key.type)
            if sub is not None:
                child = f"{path}.{key.name}" if path else key.name
                walk(sub, child if dataclasses.is_dataclass(key.type) else f"{child}.<name>")

    walk(Config, "")
    return out


# ----------------------------------------------------------------------------- rendering


def type_name(tp: Any) -> str:
    """A config type as a reader writes its values: `int`, `float`, `"a" | "b"`, `list[int]`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return f"dict[{type_name(kt)}, {type_name(vt)}]"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """One value in YAML flow style, as it would be written in a config file."""
    text = yaml.safe_dump(config_module._lists(value), default_flow_style=True, allow_unicode=True, width=1 << 16)
    return text.removesuffix("\n").removesuffix("\n...").strip()


INTRO = """\
One YAML file per experiment (`configs/*.yaml`); `key.path=value` overrides on the command
line change any key. Unknown keys, wrong types and impossible values stop the run with one
line naming the key and the file. Float keys take, in files and overrides alike, any
spelling Python's `float()` reads (`3e-4`, `1e-3`, `1.0e6`, which YAML 1.1 alone would read
as strings), but not NaN or infinity; integer keys take integers only
(`training.max_steps=1e3` is refused). List keys are YAML lists, on the command line too
(`eval.wmax=[2048,8192]`).

A pretrained base (`base_model.name` other than `gpt`) sets `base_model.depth`, `model_dim`,
`head_dim`, `rope_base`, `softcap` and `dataset.vocab_size` from its config.json or GGUF
metadata, whatever the file says ([pretrained bases](pretrained.md)). `mcjax config` prints
the resolved values."""


def _docstring(cls: type) -> str:
    """A section's docstring on one line; "" where it has none (dataclass's generated signature)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """docs/config.md: every section, key, type, default and comment of mcjax/config.py."""
    out = [
        "# Config reference",
        "",
        "```bash",
        "mcjax config --config configs/tiny_mc_cpu.yaml training.max_steps=50   # the resolved config, commented",
        "```",
        "",
        f"<!-- Generated from mcjax/config.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        INTRO,
        "",
    ]
    for sec in sections():
        out.append(f"## `{sec.path}`" if sec.path else "## Top level")
        out.append("")
        if _docstring(sec.cls):
            out += [_docstring(sec.cls), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key in sec.keys:
            kind, meaning = f"`{_cell(type_name(key.type))}`", key.comment.text
            if dataclasses.is_dataclass(key.type):
                kind, default = "section", ""
            else:
                default = "required" if key.default is dataclasses.MISSING else f"`{_cell(yaml_value(key.default))}`"
            if _section_class(key.type) is not None:  # a section, or a mapping of sections
                target = f"{sec.path}.{key.name}" if sec.path else key.name
                if not dataclasses.is_dataclass(key.type):
                    target += ".<name>"
                meaning = f"{meaning} → [`{target}`](#{github_anchor(target)})".strip()
            out.append(f"| `{key.name}` | {kind} | {default} | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading's text: lower case, punctuation and symbols dropped (letters,
    digits, marks, '_' and '-' kept), spaces as hyphens."""
    kept = "".join(
        c for c in heading.lower() if c in "-_ " or unicodedata.category(c)[0] in "LNM"
    )
    return kept.replace(" ", "-")


def _comment_lines(comment: Comment, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in comment.above]


def commented_yaml(cfg: Config, overrides: typing.Sequence[str] = ()) -> str:
    """The resolved `cfg` as YAML, each key with the comments config.py writes beside and
    above it; `yaml.safe_load` of it builds the same config (`config_from_dict`)."""
    with_overrides = f" with {' '.join(overrides)}" if overrides else ""
    out = [f"# The resolved config of {cfg.source_file}{with_overrides} (mcjax config); every key: docs/config.md"]

    def emit(obj: Any, cls: type, depth: int) -> None:
        indent = "  " * depth
        comments = {k.name: k for k in _keys(cls)}
        for name, key in comments.items():
            value = getattr(obj, name)
            out.extend(_comment_lines(key.comment, indent))
            inline = f"  # {key.comment.inline}" if key.comment.inline else ""
            sub = _section_class(key.type)
            if sub is not None and dataclasses.is_dataclass(key.type):
                out.extend(f"{indent}# {line}" for line in textwrap.wrap(_docstring(sub), 92 - len(indent)))
                out.append(f"{indent}{name}:{inline}")
                emit(value, sub, depth + 1)
            elif sub is not None:  # dict[str, dataclass]: one block per entry
                out.append(f"{indent}{name}:{inline}" if value else f"{indent}{name}: {{}}{inline}")
                for entry, item in value.items():
                    out.append(f"{indent}  {yaml_value(entry)}:")
                    emit(item, sub, depth + 2)
            else:
                out.append(f"{indent}{name}: {yaml_value(value)}{inline}")

    emit(cfg, Config, 0)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m mcjax.config_doc [PATH]`: write docs/config.md to PATH (default: stdout)."""
    argv = sys.argv[1:] if argv is None else argv
    text = markdown()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
