// The mmret search page: plain JavaScript, no dependencies, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const textInput = $("query-text");
const imageInput = $("image-input");
const dropZone = $("drop-zone");
const results = $("results");
const statusLine = $("status");
const errorBox = $("error");
const state = { image: null, imageUrl: null, like: null, request: 0 };

function setImage(file) {
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.image = file;
  state.imageUrl = file ? URL.createObjectURL(file) : null;
  $("image-chip").hidden = !file;
  if (file) $("image-preview").src = state.imageUrl;
  else $("image-preview").removeAttribute("src");
  imageInput.value = "";
}

function setLike(id) {
  state.like = id;
  $("like-banner").hidden = id === null;
  $("like-id").textContent = id ?? "";
}

function filterExpressions() {
  // Expressions are separated by spaces, except inside quotes: place="New York" is one.
  const words = $("filter").value.match(/(?:[^\s"']+|"[^"]*"?|'[^']*'?)+/g) || [];
  return words.length ? words : null;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
  statusLine.textContent = "";
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

async function search() {
  const text = textInput.value.trim();
  const k = Number($("k").value);
  const filter = filterExpressions();
  let request;
  if (state.like !== null) {
    request = jsonRequest({ like: state.like, k, filter });
  } else if (state.image) {
    const body = new FormData();
    if (text) body.append("text", text);
    body.append("image", state.image, state.image.name || "pasted-image");
    body.append("k", String(k));
    if (filter) body.append("filter", JSON.stringify(filter));
    request = { method: "POST", body, url: "/search/upload" };
  } else if (text) {
    request = jsonRequest({ text, k, filter });
  } else {
    errorBox.hidden = true;
    statusLine.textContent = "Type a query, or add an image (pick, paste or drop one).";
    textInput.focus();
    return;
  }
  const ticket = ++state.request;
  errorBox.hidden = true;
  statusLine.textContent = "Searching…";
  document.body.setAttribute("aria-busy", "true");
  try {
    const response = await fetch(request.url, { method: request.method, body: request.body, headers: request.headers });
    if (ticket !== state.request) return; // a newer search answered first or is on its way
    if (!response.ok) {
      showError(`Search failed: ${await readError(response)}`);
      results.replaceChildren();
      return;
    }
    render(await response.json());
  } catch (error) {
    if (ticket === state.request) showError(`Cannot reach the server (${error.message}). Is mmret serve running?`);
  } finally {
    if (ticket === state.request) document.body.removeAttribute("aria-busy");
  }
}

function jsonRequest(payload) {
  return {
    method: "POST",
    url: "/search",
    body: JSON.stringify(payload),
    headers: { "Content-Type": "application/json" },
  };
}

function render(answer) {
  const hits = answer.results;
  if (!hits.length) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = filterExpressions()
      ? "Nothing matches this filter. Loosen it or clear it."
      : "No results: the index is empty.";
    results.replaceChildren(empty);
    statusLine.textContent = "0 results";
    return;
  }
  const template = $("result-template");
  const cards = hits.map((hit, position) => {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.id = hit.id;
    card.setAttribute("aria-label", `Result ${position + 1}: ${hit.id}, score ${hit.score.toFixed(3)}`);
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = hit.thumbnail;
      img.alt = hit.text ? hit.text.split("\n")[0] : hit.id;
      img.loading = "lazy";
      img.addEventListener("error", () => link.replaceWith(noImage("image unavailable")));
      const link = document.createElement("a");
      link.href = `${hit.thumbnail}?size=1024`;  // the whole photo, uncropped
      link.target = "_blank";
      link.title = "Open the whole photo";
      link.append(img);
      card.querySelector(".thumb").replaceChildren(link);
    }
    card.querySelector(".score").textContent = hit.score.toFixed(3);
    card.querySelector(".item-id").textContent = hit.id;
    card.querySelector(".item-id").title = hit.id;
    const caption = card.querySelector(".caption");
    caption.textContent = hit.text ? hit.text.slice(0, 400) : "";
    caption.title = hit.text || "";
    const metadata = card.querySelector(".metadata");
    for (const [key, value] of Object.entries(hit.metadata || {})) {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = key;
      dd.textContent = typeof value === "string" ? value : JSON.stringify(value);
      dd.title = dd.textContent;
      metadata.append(dt, dd);
    }
    card.querySelector(".more-like").addEventListener("click", () => moreLike(hit.id));
    return card;
  });
  results.replaceChildren(...cards);
  const noun = hits.length === 1 ? "result" : "results";
  statusLine.textContent = `${hits.length} ${noun} in ${Math.round(answer.took_ms)} ms`;
}

function noImage(text) {
  const span = document.createElement("span");
  span.className = "no-image muted";
  span.textContent = text;
  return span;
}

function moreLike(id) {
  setLike(id);
  search();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  setLike(null);
  search();
});
imageInput.addEventListener("change", () => {
  const file = imageInput.files[0];
  if (file) { setImage(file); setLike(null); search(); }
});
$("pick-image").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); imageInput.click(); }
});
$("clear-image").addEventListener("click", () => { setImage(null); textInput.focus(); });
$("clear-like").addEventListener("click", () => { setLike(null); search(); });
document.addEventListener("paste", (event) => {
  const file = firstImage(event.clipboardData && event.clipboardData.items);
  if (file) { event.preventDefault(); setImage(file); setLike(null); search(); }
});
for (const name of ["dragenter", "dragover"]) {
  dropZone.addEventListener(name, (event) => { event.preventDefault(); dropZone.classList.add("dragging"); });
}
for (const name of ["dragleave", "drop"]) {
  dropZone.addEventListener(name, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { setImage(file); setLike(null); search(); }
  else showError("Drop an image file (JPEG, PNG, WebP, …).");
});

document.addEventListener("keydown", (event) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement?.tagName);
  if (event.key === "/" && !typing) {
    event.preventDefault();
    textInput.focus();
    textInput.select();
  } else if (event.key === "Escape") {
    if (state.image) setImage(null);
    else if (state.like !== null) { setLike(null); }
    textInput.focus();
  } else if (!typing) {
    moveFocus(event);
  }
});

function moveFocus(event) {
  const cards = [...results.querySelectorAll(".card")];
  const current = cards.indexOf(document.activeElement?.closest(".card"));
  if (!cards.length) return;
  if (event.key === "m" && current >= 0) { moreLike(cards[current].dataset.id); return; }
  const columns = Math.max(1, cards.filter((c) => c.offsetTop === cards[0].offsetTop).length);
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns }[event.key];
  if (step === undefined) return;
  event.preventDefault();
  const next = current < 0 ? 0 : Math.min(cards.length - 1, Math.max(0, current + step));
  cards[next].focus();
}

async function loadInfo() {
  try {
    const response = await fetch("/health");
    if (!response.ok) throw new Error(await readError(response));
    const info = await response.json();
    $("index-info").textContent = `${info.items.toLocaleString()} items · model ${info.encoder} · ${info.backend}`;
  } catch (error) {
    $("index-info").textContent = "";
    showError(`Cannot reach the server (${error.message}).`);
  }
}

loadInfo();
textInput.focus();
