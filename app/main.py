"""The circuits app: ``circuits app STUDY`` (or ``streamlit run app/main.py -- --study PATH``).

Five pages over one study (Formation, the landing page; Overview, Circuit, Heads, Compare),
state in the URL (page in the path; study, step, edge selection, selected node, example,
detector, speed and axis in query parameters), the study read through ``circuits`` only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bind_package(name: str = "app") -> None:
    """Make this folder the package ``app`` that the pages import (``from app import ui``),
    whatever it is called on disk: ``app/`` in a checkout, ``circuits_app`` when installed (a
    name that cannot clash with a user's own ``app``). Streamlit runs this file as a script with
    its folder on ``sys.path``, so neither name is importable by itself; this binding holds in
    the app's own process only."""
    bound = sys.modules.get(name)
    if bound is not None and Path(bound.__file__ or "").resolve().parent == HERE:
        return
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]  # another package of that name: not ours
    spec = importlib.util.spec_from_file_location(name, HERE / "__init__.py", submodule_search_locations=[str(HERE)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)


_bind_package()

import streamlit as st  # noqa: E402

from app import ui  # noqa: E402

PAGES = HERE / "views"  # not pages/: that name turns on legacy multipage mode
FAVICON = HERE / "favicon.svg"  # shipped with the app: a :material/...: page icon is fetched from a font host

# Navigation in the top bar and the sidebar closed: the Formation page needs the whole
# 1400 x 900 screen for its timeline beside the graph.
st.set_page_config(page_title="circuits", page_icon=FAVICON, layout="wide", initial_sidebar_state="collapsed")

settings = ui.settings()
page = st.navigation([
    st.Page(PAGES / "formation.py", title="Formation", icon=":material/timeline:", url_path="formation",
            default=True),
    st.Page(PAGES / "overview.py", title="Overview", icon=":material/monitoring:", url_path="overview"),
    st.Page(PAGES / "circuit.py", title="Circuit", icon=":material/hub:", url_path="circuit"),
    st.Page(PAGES / "heads.py", title="Heads", icon=":material/grid_on:", url_path="heads"),
    st.Page(PAGES / "compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
], position="top")
with st.sidebar:
    st.caption("Study")
    st.text(settings.study or "(none)")
for note in settings.notes:  # in the page, not the closed sidebar: a dropped URL value must be seen
    st.warning(ui.md(note))
page.run()
