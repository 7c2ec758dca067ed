"""Security defaults, each asserted: where the dashboard listens, what it uploads, what the code unpickles."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import tomllib

from tests.reliability.support import PYTHON, REPO, child_env

CONFIG = REPO / ".streamlit" / "config.toml"
SKIP_DIRS = {".git", ".pytest_cache", "__pycache__", "test-output", ".benchmarks", ".train", ".venv", "venv",
             "node_modules", ".whl"}
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
SQL = re.compile(r"\b(SELECT\s|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|DROP\s+TABLE|CREATE\s+TABLE)")


def _sources() -> list:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def _dotted(node) -> str:
    """'torch.load' for torch.load, 'pickle.loads' for pickle.loads, 'eval' for eval; '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append((node.lineno, "from torch import load (its calls cannot be checked for weights_only)"))
        if not isinstance(node, ast.Call):
            continue
        name, keywords = _dotted(node.func), {k.arg: k.value for k in node.keywords}
        flag = keywords.get("weights_only")
        if name == "torch.load" and not (isinstance(flag, ast.Constant) and flag.value is True):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append((node.lineno, f"{name}()"))
        elif "." in name and name.split(".")[0] in UNPICKLERS and name.split(".")[-1] in ("load", "loads",
                                                                                         "Unpickler", "open"):
            found.append((node.lineno, f"{name}()"))
        elif name.endswith("read_pickle"):
            found.append((node.lineno, f"{name}()"))
        elif name.endswith(("np.load", "numpy.load")) and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                and keywords["allow_pickle"].value:
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
        elif name in ("yaml.load", "yaml.unsafe_load") and "Loader" not in keywords:
            found.append((node.lineno, f"{name} without a safe Loader"))
    return found


def test_the_dashboard_listens_on_localhost_with_telemetry_off_and_uploads_capped():
    config = tomllib.loads(CONFIG.read_text())
    assert config["server"]["address"] == "127.0.0.1", "the dashboard starts sweeps: it must not listen on the LAN"
    assert config["browser"]["gatherUsageStats"] is False
    assert 0 < config["server"]["maxUploadSize"] <= 50, "MB; a GSM8K-sized dataset is about 1 MB"
    assert config["server"].get("enableXsrfProtection", True) is True
    assert config["server"].get("enableCORS", True) is True


def test_streamlit_itself_reads_those_settings_from_the_repo():
    """The file is where Streamlit looks (the working directory of `streamlit run app.py`) and parses as meant."""
    keys = ["server.address", "server.maxUploadSize", "browser.gatherUsageStats", "server.enableXsrfProtection",
            "server.enableCORS", "server.headless"]
    code = ("import json; from streamlit import config; config.get_config_options(force_reparse=True); "
            f"print(json.dumps({{k: config.get_option(k) for k in {keys!r}}}))")
    done = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    options = json.loads(done.stdout.strip().splitlines()[-1])
    assert options["server.address"] == "127.0.0.1" and options["browser.gatherUsageStats"] is False
    assert options["server.maxUploadSize"] <= 50
    assert options["server.enableXsrfProtection"] is True and options["server.enableCORS"] is True


def test_no_code_runs_from_data_nothing_unpickled_unsafely():
    """Every .py in the repo: torch.load only with weights_only=True; no eval/exec; no pickle-family loads."""
    sources = _sources()
    assert len(sources) > 20 and REPO / "runner" / "model.py" in sources
    unsafe = [f"{path.relative_to(REPO)}:{line}: {what}" for path in sources
              for line, what in _unsafe_calls(ast.parse(path.read_text(), filename=str(path)))]
    assert not unsafe, unsafe


def test_the_scan_would_catch_what_it_looks_for():
    bad = ("import torch, pickle, yaml\n"
           "torch.load('x')\ntorch.load('x', weights_only=False)\neval('1')\nexec('1')\n"
           "pickle.load(open('f', 'rb'))\npickle.loads(b'')\nyaml.load('a')\npd.read_pickle('f')\n"
           "np.load('f', allow_pickle=True)\n")
    assert len(_unsafe_calls(ast.parse(bad))) == 9
    good = "torch.load('x', map_location='cpu', weights_only=True)\nmodel.eval()\nyaml.safe_load('a')\n"
    assert _unsafe_calls(ast.parse(good)) == []


def test_pages_and_the_dashboard_hold_no_sql_text():
    """SQL lives in db/, with `?` parameters; a page that built SQL from a widget would bypass that."""
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in [REPO / "app.py", *(REPO / "pages").glob("*.py"),
                                                        *(REPO / "dashboard").glob("*.py")]
                 for i, line in enumerate(p.read_text().splitlines(), 1) if SQL.search(line)]
    assert not offenders, offenders
