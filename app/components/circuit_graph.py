"""The circuit graph as an ``st.components.v2`` component: SVG drawn by inline JS, no build step.

Python hands it ``graph_view.view(...)``: nodes as boxes at fixed places (heads with their q, k,
v entry points marked, role badges), edges as routed polylines (the JS rounds their corners by
less than ``graph_view.CLEAR``, so a rounded edge still clears every box), bundles of the edges
not drawn one by one. The SVG fills the width of its column and the height of the layout, so
the whole graph is on screen (it also shrinks to the room left below its top on the page). Clicking a node highlights its edges at once (the others dim) and
sends its name back as the ``node`` trigger. The nodes are drawn once and kept while the
layout stays the same: a step switch redraws only the edges, bundles and legend.

Every string from the study reaches the page through ``textContent``/``setAttribute``, never
``innerHTML``, so names show as text. Nothing is fetched at run time: the JS below is the whole
component. Each drawing ends with ``performance.mark('circuits-graph')`` (detail: the step), which
``circuits bench app`` reads to time input -> graph drawn in the browser.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from ..graph_view import ADDED, BUNDLE, CLEAR, NEEDED, OPPOSING, REMOVED

CSS = """
.cg-root { width: 100%; font-family: var(--st-font, sans-serif); }
.cg-root svg { width: 100%; display: block; }
.cg-edge { fill: none; stroke-linecap: round; stroke-linejoin: round; }
.cg-edge[data-status='removed'] { stroke-dasharray: 5 4; }
.cg-halo { fill: none; stroke-linecap: round; stroke-linejoin: round; opacity: 0.45; pointer-events: none; }
.cg-bundle { fill: none; stroke-dasharray: 2 3; opacity: 0.75; }
.cg-dim { opacity: 0.08 !important; }
.cg-hl { opacity: 1 !important; }
.cg-halo.cg-hl { opacity: 0.5 !important; }
.cg-node { cursor: pointer; }
.cg-node .shape { fill: #f4f4f4; stroke: #888; stroke-width: 1; }
.cg-node.active .shape { fill: #fff6d5; stroke: #333; stroke-width: 1.6; }
.cg-node.selected .shape { stroke: #d62728; stroke-width: 3; }
.cg-node:hover .shape { stroke: #d62728; }
.cg-node text { text-anchor: middle; dominant-baseline: central; pointer-events: none; fill: #222; }
.cg-port { fill: #fff; stroke: #333; stroke-width: 0.8; }
.cg-port-label { fill: #555 !important; }
.cg-badge rect { fill: #6a3d9a; }
.cg-badge text { fill: #fff !important; font-weight: 600; }
.cg-legend { font-size: 11px; color: var(--st-text-color, #333); margin: 2px 0 0 0; line-height: 1.4; }
.cg-legend span { margin-right: 12px; white-space: nowrap; }
.cg-note { display: block; white-space: normal !important; color: #555; }
.cg-swatch { display: inline-block; width: 22px; height: 0; vertical-align: middle;
             margin-right: 4px; border-top: 3px solid; }
"""

JS = r"""
const NS = 'http://www.w3.org/2000/svg';
const COLOURS = { needed: '__NEEDED__', opposing: '__OPPOSING__', added: '__ADDED__',
                  removed: '__REMOVED__', bundle: '__BUNDLE__' };
const RADIUS = __RADIUS__;
const MIN_HEIGHT = 280;

function el(tag, attrs, parent) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function tip(parent, text) { el('title', {}, parent).textContent = text; }

// A polyline with its corners rounded by at most RADIUS (and half of each segment).
function roundedPath(points) {
  let d = 'M' + points[0][0] + ',' + points[0][1];
  for (let i = 1; i < points.length - 1; i++) {
    const [px, py] = points[i - 1], [x, y] = points[i], [nx, ny] = points[i + 1];
    const l1 = Math.hypot(x - px, y - py), l2 = Math.hypot(nx - x, ny - y);
    const r = Math.min(RADIUS, l1 / 2, l2 / 2);
    if (r <= 0) { d += ' L' + x + ',' + y; continue; }
    const ax = x + (px - x) * r / l1, ay = y + (py - y) * r / l1;
    const bx = x + (nx - x) * r / l2, by = y + (ny - y) * r / l2;
    d += ' L' + ax.toFixed(1) + ',' + ay.toFixed(1) + ' Q' + x + ',' + y + ' ' + bx.toFixed(1) + ',' + by.toFixed(1);
  }
  const last = points[points.length - 1];
  return d + ' L' + last[0] + ',' + last[1];
}

function legendItem(legend, colour, style, text) {
  const span = document.createElement('span');
  const sw = document.createElement('span');
  sw.className = 'cg-swatch';
  sw.style.borderTopColor = colour;
  sw.style.borderTopStyle = style;
  span.appendChild(sw);
  span.appendChild(document.createTextNode(text));
  legend.appendChild(span);
}

function highlight(svg, node) {
  svg.setAttribute('data-selected', node || '');
  for (const g of svg.querySelectorAll('.cg-node')) g.classList.toggle('selected', g.getAttribute('data-node') === node);
  for (const p of svg.querySelectorAll('.cg-edge, .cg-halo')) {
    const touches = node && (p.getAttribute('data-src') === node || p.getAttribute('data-dst') === node);
    p.classList.toggle('cg-hl', Boolean(touches));
    p.classList.toggle('cg-dim', Boolean(node) && !touches);
  }
  for (const b of svg.querySelectorAll('.cg-bundle')) b.classList.toggle('cg-dim', Boolean(node));
}

function drawLegend(legend, data) {
  legend.replaceChildren();
  legendItem(legend, COLOURS.needed, 'solid', 'needed (score < 0: the task needs the edge)');
  legendItem(legend, COLOURS.opposing, 'solid', 'opposing (score > 0: works against the task)');
  legendItem(legend, COLOURS.added, 'solid', 'halo: added since the previous step (' + data.counts.added + ')');
  legendItem(legend, COLOURS.removed, 'dashed', 'removed (' + data.counts.removed + ')');
  const how = document.createElement('span');
  how.className = 'cg-note';
  how.textContent = 'Width: |score|' + (data.opacity_note ? '; ' + data.opacity_note : '') +
                    '. A head\u2019s inputs enter it at q (left), k (middle), v (right); badges: detector roles.';
  legend.appendChild(how);
  if (data.note) {
    const note = document.createElement('span');
    note.className = 'cg-note';
    note.textContent = data.note;
    legend.appendChild(note);
  }
}

function drawBundles(layer, data) {
  layer.replaceChildren();
  for (const b of data.bundles || []) {
    const [p0, p1, p2, p3] = b.points;
    const path = el('path', { d: 'M' + p0 + ' C' + p1 + ' ' + p2 + ' ' + p3, class: 'cg-bundle',
                              stroke: COLOURS.bundle, 'stroke-width': b.width, 'data-bundle': b.id,
                              'marker-end': 'url(#cg-arrow-bundle)' }, layer);
    tip(path, b.src + ' \u2192 ' + b.dst + ': ' + b.count + ' edges, summed |score| ' + b.sum);
  }
}

function drawEdges(layer, data) {
  layer.replaceChildren();
  const order = { removed: 0, kept: 1, added: 2 };  // removed underneath, added on top
  const edges = data.edges.slice().sort((a, b) => order[a.status] - order[b.status]);
  for (const e of edges) {
    const d = roundedPath(e.points);
    const common = { 'data-src': e.src, 'data-dst': e.dst };
    if (e.status === 'added') {
      el('path', { d: d, class: 'cg-halo', stroke: COLOURS.added, 'stroke-width': e.width * 1.5 + 3, ...common }, layer);
    }
    const kind = e.status === 'removed' ? 'removed' : (e.score < 0 ? 'needed' : 'opposing');
    const path = el('path', { d: d, class: 'cg-edge', stroke: e.status === 'removed' ? COLOURS.removed : e.color,
                              'stroke-width': e.width, 'stroke-opacity': e.opacity, 'data-status': e.status,
                              'data-edge': e.id, 'data-port': e.port, 'marker-end': 'url(#cg-arrow-' + kind + ')',
                              ...common }, layer);
    if (e.inclusion !== null && e.inclusion !== undefined) path.setAttribute('data-inclusion', String(e.inclusion));
    let text = e.id + '  score ' + e.score;
    if (e.se !== null && e.se !== undefined) text += ' \u00b1 ' + e.se;
    if (e.inclusion !== null && e.inclusion !== undefined) text += ', in ' + Math.round(e.inclusion * 100) + '% of resamples';
    tip(path, text + '  (' + kind + ', ' + e.status + ')');
  }
}

function drawNodes(layer, data, state) {
  const byId = {};
  for (const n of data.nodes) {
    const g = el('g', { class: 'cg-node ' + n.kind, 'data-node': n.id, role: 'button', 'aria-label': n.id }, layer);
    byId[n.id] = g;
    el('rect', { class: 'shape', x: n.x - n.w / 2, y: n.y - n.h / 2, width: n.w, height: n.h,
                 rx: n.kind === 'head' ? n.h / 2.5 : 4 }, g);
    const font = Math.max(7, Math.min(11, n.h * 0.5));
    const roomy = n.h >= 18 && n.ports.length;
    el('text', { x: n.x, y: roomy ? n.y - n.h * 0.18 : n.y, 'font-size': font }, g).textContent = n.label;
    for (const [port, px, py] of n.ports) {
      const mark = el('circle', { class: 'cg-port', cx: px, cy: py, r: Math.max(1.8, n.h / 9), 'data-port': port }, g);
      tip(mark, n.id + ' ' + port + ' input');
      if (roomy) {
        el('text', { class: 'cg-port-label', x: px, y: py - n.h * 0.22, 'font-size': font * 0.75 }, g).textContent = port;
      }
    }
    // badges sit on the box's top edge from its right corner outwards, clear of its label
    let bx = n.x + n.w / 2 - 6;
    for (const [badge, kind] of n.roles) {
      const w = badge.length * font * 0.5 + 4, h = font * 0.8 + 2;
      const b = el('g', { class: 'cg-badge', 'data-role': kind }, g);
      el('rect', { x: bx, y: n.y - n.h / 2 - h + 2, width: w, height: h, rx: 3 }, b);
      el('text', { x: bx + w / 2, y: n.y - n.h / 2 - h / 2 + 2, 'font-size': font * 0.7 }, b).textContent = badge;
      tip(b, n.id + ': ' + kind + ' head (detector role)');
      bx += w + 1;
    }
    tip(g, n.id);
    g.addEventListener('click', () => {
      highlight(state.svg, n.id);  // at once, before the server answers
      state.setTriggerValue('node', n.id);
    });
  }
  return byId;
}

// The nodes stay in place across steps: a new step redraws edges, bundles and the legend only,
// unless the layout itself (size, nodes, badges) changed.
function signature(data) {
  return data.width + 'x' + data.height + ' ' + data.nodes.map(n => n.id + ':' + n.roles.map(r => r[0]).join(',')).join(' ');
}

function build(root, data) {
  root.replaceChildren();
  const svg = el('svg', { viewBox: '0 0 ' + data.width + ' ' + data.height, preserveAspectRatio: 'xMidYMid meet',
                          'data-testid': 'circuit-graph' });
  svg.style.height = data.height + 'px';
  svg.style.maxWidth = data.width + 'px';
  const defs = el('defs', {}, svg);
  for (const [name, colour] of Object.entries(COLOURS)) {
    const marker = el('marker', { id: 'cg-arrow-' + name, viewBox: '0 0 10 10', refX: 9, refY: 5,
                                  markerWidth: 7, markerHeight: 7, markerUnits: 'userSpaceOnUse',
                                  orient: 'auto-start-reverse', class: 'cg-arrow' }, defs);
    el('path', { d: 'M0,0 L10,5 L0,10 z', fill: colour }, marker);
  }
  const state = { svg: svg, sig: signature(data), bundles: el('g', { class: 'cg-bundles' }, svg),
                  edges: el('g', { class: 'cg-edges' }, svg), legend: document.createElement('div') };
  state.nodes = drawNodes(el('g', { class: 'cg-nodes' }, svg), data, state);
  state.legend.className = 'cg-legend';
  drawLegend(state.legend, data);
  root.appendChild(svg);
  root.appendChild(state.legend);
  // Fit the screen: the drawing shrinks (viewBox keeps its proportions) to the room left below
  // its top on the page as opened, the legend included, but not under MIN_HEIGHT.
  const top = svg.getBoundingClientRect().top + window.scrollY;
  const room = window.innerHeight - top - state.legend.getBoundingClientRect().height - 12;
  svg.style.height = Math.max(MIN_HEIGHT, Math.min(data.height, room)) + 'px';
  return state;
}

export default function(component) {
  const { data, setTriggerValue, parentElement } = component;
  const began = performance.now();
  let root = parentElement.querySelector('.cg-root');
  if (!root) {
    root = document.createElement('div');
    root.className = 'cg-root';
    parentElement.appendChild(root);
  }
  if (!data || !data.nodes) { root.replaceChildren(); root.__cg = null; return; }
  let state = root.__cg;
  const fresh = !state || state.sig !== signature(data);
  if (fresh) state = root.__cg = build(root, data);
  state.setTriggerValue = setTriggerValue;
  const svg = state.svg;
  for (const [k, v] of [['step', data.step], ['edges', data.edges.length], ['added', data.counts.added],
                        ['removed', data.counts.removed], ['bundles', (data.bundles || []).length]]) {
    svg.setAttribute('data-' + k, String(v));
  }
  drawBundles(state.bundles, data);
  drawEdges(state.edges, data);
  for (const n of data.nodes) state.nodes[n.id].classList.toggle('active', Boolean(n.active));
  if (!fresh) drawLegend(state.legend, data);
  highlight(svg, data.selected || null);
  performance.mark('circuits-graph', { detail: { step: data.step, began: began } });
}
"""

for _name, _value in (("__NEEDED__", NEEDED), ("__OPPOSING__", OPPOSING), ("__ADDED__", ADDED),
                      ("__REMOVED__", REMOVED), ("__BUNDLE__", BUNDLE), ("__RADIUS__", str(CLEAR - 1))):
    JS = JS.replace(_name, _value)

_graph = st.components.v2.component("circuits_graph", css=CSS, js=JS)


def clicked_node(result: object, nodes: list[str]) -> str | None:
    """The node a click on the graph named (the component's state: an object or a dict with
    ``node``), when it is one of ``nodes``; else None."""
    clicked = getattr(result, "node", None) if result is not None else None
    if clicked is None and isinstance(result, dict):
        clicked = result.get("node")
    return clicked if clicked in nodes else None


def circuit_graph(view: dict, key: str, on_node: Callable[[], None] | None = None):
    """Mount the graph; ``result.node`` is the name of a node clicked in this rerun (or None)."""
    return _graph(key=key, data=view, on_node_change=on_node or (lambda: None), height="content")
