// ivl review: every value from a row is set with textContent (never innerHTML), so row text stays text.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { offset: 0, limit: 50, rows: [], pos: 0, total: 0, current: null, decided: 0 };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function query() {
  const q = new URLSearchParams({ offset: state.offset, limit: state.limit });
  const add = (k, id) => { const v = $(id).value; if (v !== "") q.set(k, v); };
  add("reason", "f-reason"); add("source", "f-source"); add("score", "f-score");
  add("min", "f-min"); add("max", "f-max");
  if ($("f-undecided").checked) q.set("undecided", "1");
  return q.toString();
}

function fillSelect(id, values) {
  const s = $(id);
  if (s.options.length > 1) return;
  for (const v of values) { const o = el("option", v); o.value = v; s.appendChild(o); }
}

async function loadList(keepPos) {
  const r = await fetch("/api/rows?" + query());
  const data = await r.json();
  state.rows = data.rows; state.total = data.total;
  fillSelect("f-reason", data.reasons); fillSelect("f-source", data.sources); fillSelect("f-score", data.scores);
  state.decided = data.decided;
  showProgress();
  const page = Math.floor(state.offset / state.limit) + 1, pages = Math.max(1, Math.ceil(data.total / state.limit));
  $("page").textContent = `page ${page} / ${pages}`;
  const list = $("list");
  list.replaceChildren();
  list.start = state.offset + 1;
  state.rows.forEach((row, i) => {
    const li = el("li", `${row.id} — ${row.reasons.join(", ")}`, row.decision);
    li.dataset.pos = i;
    li.addEventListener("click", () => show(i));
    list.appendChild(li);
  });
  if (state.rows.length) show(keepPos ? Math.min(state.pos, state.rows.length - 1) : 0);
  else { $("row-id").textContent = "no rows match"; state.current = null; }
}

function showProgress() { $("progress").textContent = `${state.decided} decided · ${state.total} rows match`; }

async function show(pos) {
  state.pos = pos;
  const brief = state.rows[pos];
  const r = await fetch("/api/row/" + brief.idx);
  const row = await r.json();
  state.current = row;
  document.querySelectorAll("#list li").forEach((li) => li.classList.toggle("current", Number(li.dataset.pos) === pos));
  $("row-id").textContent = row.id;
  $("row-decision").textContent = row.decision ? `decided: ${row.decision}` : "";
  $("row-meta").textContent = `source ${row.source} · category ${row.category || "-"} · ${row.images} image(s) · meta ${row.meta}`;
  const imgs = $("images"); imgs.replaceChildren();
  for (let i = 0; i < row.images; i++) { const im = el("img"); im.src = `/api/image/${row.idx}/${i}`; im.alt = `image ${i}`; imgs.appendChild(im); }
  const conv = $("conversation"); conv.replaceChildren();
  for (const t of row.conversations) {
    const d = el("div", undefined, "turn " + t.from);
    d.appendChild(el("span", t.from, "role"));
    d.appendChild(document.createTextNode(t.value));
    conv.appendChild(d);
  }
  const reasons = $("reasons"); reasons.replaceChildren();
  for (const x of row.reasons) reasons.appendChild(el("li", x));
  const scores = $("scores"); scores.replaceChildren();
  for (const [k, v] of Object.entries(row.scores)) {
    const tr = el("tr"); tr.appendChild(el("td", k)); tr.appendChild(el("td", v === null ? "-" : Number(v).toFixed(4)));
    scores.appendChild(tr);
  }
  const nb = $("neighbours"); nb.replaceChildren();
  for (const x of row.dup_neighbours) nb.appendChild(el("li", x));
  if (!row.dup_neighbours.length) nb.appendChild(el("li", "none"));
  $("note").value = row.note || "";
  $("status").textContent = "";
}

async function decide(decision) {
  if (!state.current) return;
  const body = { id: state.current.id, decision, note: $("note").value };
  const r = await fetch("/api/decision", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!r.ok) { $("status").textContent = "not saved: " + (await r.text()); return; }
  const rec = await r.json();
  const brief = state.rows[state.pos];
  brief.decision = rec.decision; brief.note = rec.note;
  const li = document.querySelector(`#list li[data-pos="${state.pos}"]`);
  if (li) { li.classList.remove("keep", "reject"); li.classList.add(rec.decision); }
  $("status").textContent = `saved: ${rec.decision}`;
  if (!state.current.decision) state.decided += 1;
  showProgress();
  state.current.decision = rec.decision;
  step(1);
}

function step(d) {
  const p = state.pos + d;
  if (p >= 0 && p < state.rows.length) show(p);
  else if (p >= state.rows.length && state.offset + state.limit < state.total) { state.offset += state.limit; loadList(false); }
  else if (p < 0 && state.offset > 0) { state.offset -= state.limit; state.pos = state.limit - 1; loadList(true); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); state.offset = 0; loadList(false); });
  $("keep").addEventListener("click", () => decide("keep"));
  $("reject").addEventListener("click", () => decide("reject"));
  $("next-page").addEventListener("click", () => { if (state.offset + state.limit < state.total) { state.offset += state.limit; loadList(false); } });
  $("prev-page").addEventListener("click", () => { if (state.offset > 0) { state.offset -= state.limit; loadList(false); } });
  document.addEventListener("keydown", (e) => {
    if (["TEXTAREA", "INPUT", "SELECT"].includes(document.activeElement.tagName)) return;
    if (e.key === "k") decide("keep");
    else if (e.key === "r") decide("reject");
    else if (e.key === "j" || e.key === "ArrowRight") step(1);
    else if (e.key === "h" || e.key === "ArrowLeft") step(-1);
  });
  loadList(false);
});
