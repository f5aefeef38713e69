"""The circuit graph as an ``st.components.v2`` component: SVG drawn by inline JS, no build step.

Python hands it ``graph_view.view(...)`` (nodes at fixed positions, styled edges); clicking a
node sends its name back as the ``node`` trigger. An edge's tooltip gives its score +- its
bootstrap standard error and the share of resamples holding it, where the study has them. Every string from the study reaches the page
through ``textContent``/``setAttribute``, never ``innerHTML``, so names show as text.
Nothing is fetched at run time: the JS below is the whole component.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

CSS = """
.cg-root { width: 100%; font-family: var(--st-font, sans-serif); }
.cg-root svg { width: 100%; height: auto; display: block; margin: 0 auto; }
.cg-edge { fill: none; stroke-linecap: round; }
.cg-edge[data-status='kept'] { opacity: 0.85; }
.cg-edge[data-status='added'] { opacity: 0.95; }
.cg-edge[data-status='removed'] { stroke-dasharray: 5 4; opacity: 0.8; }
.cg-node { cursor: pointer; }
.cg-node .shape { fill: #f4f4f4; stroke: #777; stroke-width: 1.2; }
.cg-node.active .shape { fill: #fff6d5; stroke: #333; stroke-width: 1.8; }
.cg-node.selected .shape { stroke: #ff7f0e; stroke-width: 3.5; }
.cg-node:hover .shape { stroke: #ff7f0e; }
.cg-node text { font-size: 11px; text-anchor: middle; dominant-baseline: central;
                pointer-events: none; fill: #222; }
.cg-legend { font-size: 12px; color: var(--st-text-color, #333); margin: 2px 0 6px 0; }
.cg-legend span { margin-right: 14px; white-space: nowrap; }
.cg-swatch { display: inline-block; width: 22px; height: 0; vertical-align: middle;
             margin-right: 4px; border-top: 3px solid; }
"""

JS = r"""
export default function(component) {
  const { data, setTriggerValue, parentElement } = component;
  const NS = 'http://www.w3.org/2000/svg';
  let root = parentElement.querySelector('.cg-root');
  if (!root) {
    root = document.createElement('div');
    root.className = 'cg-root';
    parentElement.appendChild(root);
  }
  while (root.firstChild) root.removeChild(root.firstChild);
  if (!data || !data.nodes) return;

  const legend = document.createElement('div');
  legend.className = 'cg-legend';
  const items = [['#2166ac', 'solid', 'kept, positive'], ['#b2182b', 'solid', 'kept, negative'],
                 ['#1a9850', 'solid', 'added (' + data.counts.added + ')'],
                 ['#9e9e9e', 'dashed', 'removed (' + data.counts.removed + ')']];
  for (const [colour, style, text] of items) {
    const span = document.createElement('span');
    const sw = document.createElement('span');
    sw.className = 'cg-swatch';
    sw.style.borderTopColor = colour;
    sw.style.borderTopStyle = style;
    span.appendChild(sw);
    span.appendChild(document.createTextNode(text));
    legend.appendChild(span);
  }
  root.appendChild(legend);

  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 ' + data.width + ' ' + data.height);
  svg.setAttribute('data-testid', 'circuit-graph');
  svg.setAttribute('data-step', String(data.step));
  svg.setAttribute('data-edges', String(data.edges.length));
  svg.setAttribute('data-added', String(data.counts.added));
  svg.setAttribute('data-removed', String(data.counts.removed));
  svg.style.maxWidth = Math.round(data.width * 1.7) + 'px';
  const pos = {};
  for (const n of data.nodes) pos[n.id] = n;

  const edgeLayer = document.createElementNS(NS, 'g');
  // removed first (underneath), then kept, then added on top
  const order = { removed: 0, kept: 1, added: 2 };
  const edges = data.edges.slice().sort((a, b) => order[a.status] - order[b.status]);
  for (const e of edges) {
    const s = pos[e.src], d = pos[e.dst];
    if (!s || !d) continue;
    const x2 = d.x + e.offset * 9, y2 = d.y + 13;
    const y1 = s.y - 13;
    const cx = (s.x + x2) / 2 + e.offset * 22, cy = (y1 + y2) / 2;
    const path = document.createElementNS(NS, 'path');
    path.setAttribute('d', 'M' + s.x + ',' + y1 + ' Q' + cx + ',' + cy + ' ' + x2 + ',' + y2);
    path.setAttribute('class', 'cg-edge');
    path.setAttribute('stroke', e.color);
    path.setAttribute('stroke-width', String(e.width));
    path.setAttribute('data-status', e.status);
    path.setAttribute('data-edge', e.id);
    const title = document.createElementNS(NS, 'title');
    let tip = e.id + '  score ' + e.score;
    if (e.se !== null && e.se !== undefined) tip += ' \u00b1 ' + e.se;
    if (e.inclusion !== null && e.inclusion !== undefined) {
      tip += ', in ' + Math.round(e.inclusion * 100) + '% of resamples';
      path.setAttribute('data-inclusion', String(e.inclusion));
    }
    title.textContent = tip + '  (' + e.status + ')';
    path.appendChild(title);
    edgeLayer.appendChild(path);
  }
  svg.appendChild(edgeLayer);

  for (const n of data.nodes) {
    const g = document.createElementNS(NS, 'g');
    g.setAttribute('class', 'cg-node ' + n.kind + (n.active ? ' active' : '') + (n.selected ? ' selected' : ''));
    g.setAttribute('data-node', n.id);
    g.setAttribute('role', 'button');
    g.setAttribute('aria-label', n.id);
    let shape;
    if (n.kind === 'head') {
      shape = document.createElementNS(NS, 'circle');
      shape.setAttribute('cx', n.x); shape.setAttribute('cy', n.y); shape.setAttribute('r', 14);
    } else {
      const w = n.kind === 'mlp' ? 44 : 64;
      shape = document.createElementNS(NS, 'rect');
      shape.setAttribute('x', n.x - w / 2); shape.setAttribute('y', n.y - 12);
      shape.setAttribute('width', w); shape.setAttribute('height', 24);
      shape.setAttribute('rx', 5);
    }
    shape.setAttribute('class', 'shape');
    g.appendChild(shape);
    const label = document.createElementNS(NS, 'text');
    label.setAttribute('x', n.x); label.setAttribute('y', n.y);
    label.textContent = n.label;
    g.appendChild(label);
    const title = document.createElementNS(NS, 'title');
    title.textContent = n.id;
    g.appendChild(title);
    g.addEventListener('click', () => setTriggerValue('node', n.id));
    svg.appendChild(g);
  }
  root.appendChild(svg);
}
"""

_graph = st.components.v2.component("circuits_graph", css=CSS, js=JS)


def circuit_graph(view: dict, key: str, on_node: Callable[[], None] | None = None):
    """Mount the graph; ``result.node`` is the name of a node clicked in this rerun (or None)."""
    return _graph(key=key, data=view, on_node_change=on_node or (lambda: None), height="content")
