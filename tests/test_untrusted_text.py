"""Text from a file is shown as text: every page of the real app, on a database whose every text is a payload.

The database (tests/hostile.py) carries Markdown images, HTML tags, links, autolinks and Streamlit
directives in its run names, notes, tags, model and dataset names, stored error, problem ids,
questions and golds. Every element the browser would render as Markdown (bodies, labels, help,
metric values, expander and popover labels, radio and segmented-control options) or Plotly's HTML
subset must hold no raw payload; the plain-text ones (st.text, st.code, dataframes, selectbox and
multiselect options, input values and placeholders) may, and the question must reach one of them.
The Markdown documents we write (report, `status --markdown`) and the terminal get the same care.
"""
from __future__ import annotations

import re
import subprocess

import pytest
from google.protobuf.message import Message
from streamlit.testing.v1 import AppTest

from db.store import Store
from tests.hostile import hostile_text_database, raw_fragments, text_payloads
from tests.reliability.support import PYTHON, REPO, child_env

APP = str(REPO / "app.py")
HOST = "127.0.0.1:9"
PAGES = ["pages/run.py", "pages/progress.py", "pages/importance.py", "pages/difficulty.py", "pages/problems.py",
         "pages/compare.py", "pages/export.py"]
# Elements whose every string is shown as typed: the frontend never parses them as Markdown.
PLAIN_ELEMENTS = {"Arrow", "Json"}
# Fields shown as typed inside elements whose other strings (label, help) are Markdown.
PLAIN_FIELDS = {"Text": {"body"}, "Code": {"code_text"},
                "Selectbox": {"options", "default", "placeholder", "raw_value", "value"},
                "MultiSelect": {"options", "default", "placeholder", "raw_values", "value"},
                "TextInput": {"value", "default", "placeholder"}, "TextArea": {"value", "default", "placeholder"},
                "DownloadButton": {"url"}}


ESCAPED = re.compile(r"\\[!-/:-@\[-`{-~]")


def _strings(message: Message, skip: set[str] = frozenset()):
    """Every string inside a protobuf message, with its field name, except the fields in `skip`."""
    for field, value in message.ListFields():
        if field.name in skip:
            continue
        repeated = not isinstance(value, (str, bytes, Message)) and hasattr(value, "__iter__")
        values = value if repeated else [value]
        for item in values:
            if isinstance(item, str):
                yield field.name, item
            elif isinstance(item, Message):
                yield from _strings(item)


def rendered(node, where: str = ""):
    """(where, kind, text) for every string of the page the browser renders as Markdown or as Plotly HTML."""
    proto = getattr(node, "proto", None)
    if isinstance(proto, Message):
        kind = proto.DESCRIPTOR.name
        if kind == "PlotlyChart":
            yield where, "plotly", proto.spec
        elif kind not in PLAIN_ELEMENTS:
            for name, text in _strings(proto, PLAIN_FIELDS.get(kind, set())):
                yield f"{where}/{kind}.{name}", "markdown", text
    for key, child in getattr(node, "children", {}).items():
        yield from rendered(child, f"{where}/{key}")


def plain_texts(at: AppTest) -> str:
    return "\n".join(e.value for e in at.text)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir, tiny_reasoner):
    path = tmp_path_factory.mktemp("hostile") / "hostile.duckdb"
    ids = hostile_text_database(path, tiny_model_dir, tiny_reasoner, HOST)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THOUGHTSWEEP_DB", str(path))
        yield path, ids


def _leaks(at: AppTest) -> list[str]:
    fragments = raw_fragments(HOST)
    found = []
    for where, kind, text in rendered(at._tree):
        if kind == "plotly":  # no Markdown there, only Plotly's HTML subset: the tag payloads are the danger
            checked = [f for f in fragments if f.startswith("<")]
        else:  # a backslash-escaped character is a literal one (CommonMark 2.4): it starts no markup
            checked, text = fragments, ESCAPED.sub("\0", text)
        found += [f"{where}: {text[:160]!r}" for f in checked if f in text]
    return found


def test_the_walk_would_catch_a_raw_payload(hostile):
    """The check itself: a page that printed a payload through st.markdown is caught; st.text is not."""
    payload = text_payloads(HOST)["image"]
    script = f"import streamlit as st\nst.text({payload!r})\nst.caption('x')\nst.markdown({payload!r})\n"
    at = AppTest.from_string(script).run()
    leaks = _leaks(at)
    assert len(leaks) == 1 and "Markdown.body" in leaks[0], leaks


def test_no_page_renders_file_text_as_markup(hostile):
    sweep_id, empty_id = hostile[1]
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception, [e.message for e in at.exception]
    charts = []
    for run_id in (empty_id, sweep_id):
        at.sidebar.selectbox(key="run_id").set_value(run_id).run()
        for page in PAGES:
            at.switch_page(page).run()
            assert not at.exception, (page, run_id, [e.message for e in at.exception])
            assert not _leaks(at), (page, run_id, _leaks(at))
            charts += [text for _, kind, text in rendered(at._tree) if kind == "plotly"]
    assert any("&lt;img src=http" in spec for spec in charts), "a variant's method name reaches a chart, escaped"
    # every problem's drill-down: its id, question and gold, and the logit lens of each variant
    at.switch_page("pages/problems.py").run()
    problem_ids = list(at.selectbox(key="problem_id").options)
    assert len(problem_ids) == 6
    for problem_id in problem_ids:
        at.selectbox(key="problem_id").set_value(problem_id).run()
        assert not at.exception, [e.message for e in at.exception]
        assert not _leaks(at), (problem_id, _leaks(at))
    question = [t for t in plain_texts(at).splitlines() if "apples" in t]
    assert question and any(p in question[0] for p in text_payloads(HOST).values()), \
        "the question is shown, as the characters it is"
    assert any("run" in c.value and "image" in c.value for c in at.caption), "the run's name is in its caption"



def test_the_markdown_documents_we_write_hold_file_text_as_text(hostile):
    """The experiment report (export --format markdown, the Export page) and `status --markdown` are Markdown
    that GitHub or an editor renders: the run's name, model, dataset, error and config are escaped there too."""
    from dashboard import state
    from db.report import markdown_report
    from db.status_page import status_markdown
    path, (sweep_id, empty_id) = hostile
    store = state.open_service(str(path.resolve())).store  # the dashboard's Store holds the file in this process
    for document in (markdown_report(store, sweep_id), status_markdown(store, sweep_id),
                     status_markdown(store, empty_id)):
        raw = [f for f in raw_fragments(HOST) if f in ESCAPED.sub("\0", document)]
        assert not raw, (raw, document[:600])
        assert "127\\.0\\.0\\.1\\:9" in document  # the payloads are there, escaped


def test_the_terminal_gets_no_escape_sequence_from_a_file(tmp_path):
    """`status` and `status --markdown` print a run's name: its control characters come out as visible \\xNN."""
    path = tmp_path / "escapes.duckdb"
    store = Store(path)
    store.create_run(name="run \x1b]0;pwned\x07\x1b[2J\x9b1m end", model="m\x1b[31m", dataset="d", config={},
                     num_latent=6, n_variants=1, total=1, status="stopped")
    store.close()
    for flags in ([], ["--markdown"]):
        done = subprocess.run([PYTHON, "-m", "runner", "status", "--db", str(path), *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env=child_env())
        assert done.returncode == 0, done.stderr
        assert not any(c in done.stdout for c in "\x1b\x07\x9b"), repr(done.stdout)
        assert "pwned" in done.stdout and "x1b" in done.stdout, repr(done.stdout)



def test_no_cli_line_passes_a_datasets_control_characters_to_the_terminal(tmp_path, tiny_model_dir):
    """Every line the CLI writes goes through one `say`: ids, reasons, names and file names from a dataset
    come out with their control characters as visible \\xNN, in validate-data, sweep, status and errors."""
    import json
    evil = "\x1b]0;pwned\x07\x1b[2J\x9b1m"
    records = [{"id": f"ok{evil}", "question": f"Tom has 3 apples{evil} and buys 2. How many?", "answer": "#### 5"},
               {"id": f"long{evil}", "question": "apples " * 400 + "?", "answer": "#### 1"},
               {"id": f"two{evil}", "question": "And 2 more apples?", "answer": "#### 2"}]
    dataset = tmp_path / f"data{evil}.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    empty = tmp_path / f"empty{evil}.jsonl"
    empty.write_text(json.dumps({"id": f"noanswer{evil}", "question": f"What{evil}?"}) + "\n")
    db = tmp_path / "t.duckdb"
    commands = [["validate-data", str(dataset), "--model", str(tiny_model_dir)], ["validate-data", str(empty)],
                ["sweep", "--model", str(tiny_model_dir), "--dataset", str(dataset), "--db", str(db), "--quiet",
                 "--schemes", "prefix", "--run-name", f"name{evil}"],
                ["status", "--db", str(db)], ["status", "--db", str(db), "--markdown"],
                ["sweep", "--model", str(tiny_model_dir), "--dataset", str(empty), "--db", str(db), "--quiet"]]
    said = []
    for command in commands:
        done = subprocess.run([PYTHON, "-m", "runner", *command], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=child_env())
        said.append((command[0], done.returncode, done.stdout + done.stderr))
    assert [code for _, code, _ in said] == [0, 1, 0, 0, 0, 2], said
    for command, _, text in said:
        assert not any(c in text for c in "\x1b\x07\x9b"), (command, text)
    everything = "".join(text for _, _, text in said)
    assert "long\\x1b]0;pwned\\x07" in everything  # the skipped problem's id, shown, escaped
    assert "empty\\x1b]0;pwned" in everything  # a file name in an error line
