"""The Streamlit app (``circuits app STUDY``): circuit graphs evolving step by step.

- ``main.py``: entry point; ``st.navigation`` over the pages in ``views/`` (not ``pages/``,
  which would switch Streamlit to its legacy multipage mode).
- ``views/``: Overview, Circuit, Heads, Compare.
- ``state.py``: the one settings dataclass, parsed from and written to the URL.
- ``data.py``: cached reads of the study, through the library's API only (no h5py here).
- ``graph_view.py``: pure layout, routing, key edges and bundles of the circuit graph (no Streamlit; unit-tested).
- ``components/``: the SVG graph as an ``st.components.v2`` component (inline JS).
- ``charts.py``: the app's own plotly figures; study-level figures come from ``circuits.figures``.
- ``ui.py``: shared page helpers (errors as messages, text escaping).
- ``formation.py``: the formation account as the pages word it (no Streamlit; unit-tested).
- ``circuits/bench/app.py`` (drives ``main.py`` by path, importing nothing from here): ``bench_app()``.

Installed, this folder is the package ``circuits_app`` (pyproject ``package-dir``); ``main.py``
binds it as ``app`` in the app's own process, so the pages import ``app.xxx`` either way and the
package's modules import each other relatively.

Rules: the library never imports this package; strings from files are shown as text, never
as markdown or HTML; every cached function's inputs are in its key.
"""
