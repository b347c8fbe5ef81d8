"""docs/formats.md stays true to the code: its marked field tables are generated from the dataclasses.

- The tables between `<!-- fields: module.Class -->` and `<!-- /fields -->` are what
  scripts/gen_format_docs.py generates from the record, metrics and settings types today.
- A field's help, type or default is what its table row says, so changing one changes the docs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import load_script

from gsmkit.fields import setting

ROOT = Path(__file__).resolve().parent.parent


gen = load_script("gen_format_docs")


@dataclass(frozen=True)
class Row:
    """A row.

    Attributes:
        name: the row's name
        score: how good it is; null when | unknown
    """

    name: str
    score: float | None


@dataclass(frozen=True)
class RowChanged:
    """A row, changed.

    Attributes:
        name: the row's new name
        score: how good it is; null when | unknown
        tags: labels, described on two lines of the
            docstring
    """

    name: str
    score: float | None
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class InputRow:
    """An input row.

    Attributes:
        text: the text
        id: optional id
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("text",)

    text: str
    id: str


@dataclass(frozen=True)
class Knobs:
    out: Path = setting(Path("runs/x"), "Output folder.")
    rate: float = setting(2e-4, "Learning rate.", min=0, min_open=True)
    share: float = setting(0.03, "A share.", min=0, max=0.999)
    name: str | None = setting(None, "A name.", show_default="--out's name")
    quiet: bool = setting(False, "Print less.")


def test_formats_md_is_current(capsys):
    status = gen.main(["--check"])
    assert status == 0, (
        "docs/formats.md is out of date: run `python scripts/gen_format_docs.py`\n" + capsys.readouterr().err
    )


def test_formats_md_marks_the_record_and_metrics_tables():
    marked = gen.marked_classes((ROOT / "docs" / "formats.md").read_text(encoding="utf-8"))
    for target in ("gsmkit.records.Problem", "gsmkit.records.FewshotExample", "gsmkit.records.Prediction",
                   "gsmkit.evaluation.gsm8k.EvalMetrics", "gsmkit.evaluation.perplexity.PplMetrics",
                   "gsmkit.evaluation.safety.SafetyMetrics", "gsmkit.evaluation.safety.GroupCounts",
                   "gsmkit.traces.TraceStats", "gsmkit.adapters.merge.MergeReport",
                   "gsmkit.adapters.audit_results.AuditResult", "gsmkit.adapters.audit_results.ModuleAudit",
                   "gsmkit.training.config.TrainSettings"):
        assert target in marked


def test_field_table_rows_come_from_fields():
    assert gen.field_table(Row) == [
        "| field | type | meaning |",
        "|---|---|---|",
        "| `name` | string | the row's name |",
        "| `score` | float or null | how good it is; null when \\| unknown |",
    ]


def test_changing_help_or_adding_a_field_changes_the_table():
    before, after = gen.field_table(Row), gen.field_table(RowChanged)
    assert before != after
    assert "| `name` | string | the row's new name |" in after
    assert "| `tags` | [string] | labels, described on two lines of the docstring |" in after
    assert before[3] == after[3]  # an unchanged field keeps its row


def test_required_column_for_input_records():
    assert gen.field_table(InputRow)[:2] == ["| field | type | required | meaning |", "|---|---|---|---|"]
    assert gen.field_table(InputRow)[2:] == ["| `text` | string | yes | the text |",
                                            "| `id` | string | no | optional id |"]


def test_settings_table_has_defaults():
    assert gen.field_table(Knobs) == [
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        "| `out` | string (a path) | `runs/x` | Output folder. |",
        "| `rate` | float, > 0 | 0.0002 | Learning rate. |",
        "| `share` | float, 0 to 0.999 | 0.03 | A share. |",
        "| `name` | string or null | null (--out's name) | A name. |",
        "| `quiet` | bool | false | Print less. |",
    ]
    assert [line.split(" | ")[0] for line in gen.field_table(Knobs, omit=("out",))[2:]] == [
        "| `rate`", "| `share`", "| `name`", "| `quiet`"]


@pytest.mark.parametrize(("annotation", "label"), [
    (str, "string"), (int, "int"), (float, "float"), (bool, "bool"), (str | None, "string or null"),
    (tuple[float, float], "[float, float]"), (tuple[str, ...], "[string]"),
    (list[dict[str, Any]], "[object]"), (dict[str, Any], "object"), (dict, "object"), (list, "list"),
    (tuple, "list"), (int | float, "int or float"),
])
def test_type_labels(annotation, label):
    assert gen.type_label(annotation) == label


def test_render_replaces_only_marked_tables():
    target = f"{__name__}.Row"
    text = (f"intro\n\n<!-- fields: {target} -->\n| stale | table |\n|---|---|\n<!-- /fields -->\n\n"
            "| hand | written |\n|---|---|\n")
    out = gen.render(text)
    assert out.startswith(f"intro\n\n<!-- fields: {target} -->\n| field | type | meaning |\n")
    assert out.endswith("<!-- /fields -->\n\n| hand | written |\n|---|---|\n")
    assert gen.render(out) == out


def test_check_fails_on_drift(tmp_path, capsys):
    page = tmp_path / "formats.md"
    page.write_text(f"<!-- fields: {__name__}.Row -->\n| old |\n<!-- /fields -->\n", encoding="utf-8")
    assert gen.main(["--check", "--output", str(page)]) == 1
    assert "the row's name" in capsys.readouterr().err  # the diff summary shows what would change
    assert gen.main(["--output", str(page)]) == 0
    assert gen.main(["--check", "--output", str(page)]) == 0


@pytest.mark.parametrize("text", [
    "<!-- fields: gsmkit.records.NoSuchRecord -->\n<!-- /fields -->\n",
    "<!-- fields: gsmkit.records.Prediction -->\n| open |\n",
    "<!-- fields: gsmkit.records.Prediction color=red -->\n<!-- /fields -->\n",
])
def test_bad_markers_are_errors(text):
    with pytest.raises(gen.FormatDocsError):
        gen.render(text)


def test_a_field_without_help_is_an_error():
    @dataclass
    class Bare:
        x: int = dataclasses.field(default=0)

    with pytest.raises(gen.FormatDocsError, match="no meaning for x"):
        gen.field_table(Bare)


def test_preset_table_matches_presets():
    # hand-written (PRESETS is not a dataclass), so checked here: each row lists exactly its preset's values
    from gsmkit.training.config import PRESETS

    text = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
    section = text[text.index("The presets (`--preset`) set:"):]
    for name, values in PRESETS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        listed = set(re.findall(r"`(\w+): ([^`]+)`", row))
        assert listed == {(k, f"{v:g}" if isinstance(v, float) else str(v)) for k, v in values.items()}, row


def test_attribute_docs_follow_the_class_hierarchy_and_a_subclass_can_redescribe():
    from gsmkit.fields import field_help

    @dataclass
    class Base:
        """Base.

        Attributes:
            a: the base's a
            b: the base's b, on
                two lines
        """

        a: int
        b: int

    @dataclass
    class Child(Base):
        """Child.

        Attributes:
            a: the child's a
            c: the child's own
        """

        c: int

    assert field_help(Child) == {"a": "the child's a", "b": "the base's b, on two lines",
                                 "c": "the child's own"}
