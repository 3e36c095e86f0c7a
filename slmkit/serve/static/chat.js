// slmkit chat page: lists models, streams chat completions over SSE (fetch + ReadableStream), stop aborts.
"use strict";
const $ = (id) => document.getElementById(id);
let messages = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  const body = await r.json();
  if (!r.ok) { $("status").textContent = body.error ? body.error.message : "cannot list models"; return; }
  const sel = $("model");
  sel.innerHTML = "";
  const chats = ["decoder", "router", "remote"];  // router: the model `auto` (slm serve --router); remote: NAME=URL
  for (const m of body.data.filter((m) => chats.includes(m.kind))) {
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    sel.appendChild(o);
  }
  $("status").textContent = sel.options.length ? "" : "no chat model is served";
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  controller = new AbortController();
  busy(true);
  $("status").textContent = "generating…";
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("model").value, messages, stream: true,
                             temperature: parseFloat($("temperature").value),
                             max_tokens: parseInt($("max-tokens").value, 10) }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const delta = JSON.parse(data).choices[0]?.delta?.content;
        if (delta) { reply += delta; out.textContent = reply; $("log").scrollTop = $("log").scrollHeight; }
      }
    }
    $("status").textContent = "done";
  } catch (e) {
    if (e.name === "AbortError") { $("status").textContent = "stopped"; }
    else { out.classList.add("error"); out.textContent = reply + " [" + e.message + "]"; $("status").textContent = ""; }
  } finally {
    messages.push({ role: "assistant", content: reply });
    controller = null;
    busy(false);
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => { messages = []; $("log").innerHTML = ""; $("status").textContent = ""; });
$("api-key").addEventListener("change", loadModels);
loadModels();
