// The playground: chat with the served model over /v1/chat/completions (SSE), in the browser.
// Model output (and the user's text) is data, never markup: every node is built with
// createElement and text nodes; nothing here assigns innerHTML.
"use strict";

const KEY_STORAGE = "pagedserve.apiKey";
const RETRY_MS = 2000;  // /v1/models answers 503 while the model loads

const state = {
  model: null,          // the served model's id, from /v1/models
  needsKey: false,      // /v1/models answered 401 without a key
  history: [],          // the conversation sent with each request: {role, content}
  controller: null,     // the AbortController of the answer being streamed
};

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- the server: model card, auth, errors -------------------------------------------------

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not the error envelope */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel(key = sessionStorage.getItem(KEY_STORAGE) || "") {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders(key) });
  } catch (error) {
    $("model-info").textContent = `server unreachable (${error.message}); retrying`;
    setTimeout(loadModel, RETRY_MS);
    return;
  }
  if (response.status === 401) {
    askForKey(key ? await errorText(response) : "");
    return;
  }
  if (!response.ok) {
    $("model-info").textContent = `${await errorText(response)}; retrying`;
    setTimeout(loadModel, RETRY_MS);
    return;
  }
  if (key) sessionStorage.setItem(KEY_STORAGE, key);  // kept only once the server took it
  showModel((await response.json()).data[0]);
}

function showModel(card) {
  state.model = card.id;
  const context = card.max_model_len ? ` · context ${card.max_model_len} tokens` : "";
  $("model-info").textContent = `${card.id}${context}`;
  if (card.max_model_len) $("max-tokens").max = String(card.max_model_len);
  $("key-error").hidden = true;
  $("key-note").textContent = state.needsKey ? "API key accepted (kept in this tab only)." : "";
  $("send").disabled = state.controller !== null;
}

// A wrong key shows the server's 401 message; no key yet shows only the note.
function askForKey(message) {
  state.needsKey = true;
  state.model = null;
  sessionStorage.removeItem(KEY_STORAGE);
  $("send").disabled = true;
  $("model-info").textContent = "API key needed";
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key-error").hidden = !message;
  $("api-key").focus();
}

// ---- requests ---------------------------------------------------------------------------------

function numberField(id) {
  const value = $(id).valueAsNumber;
  return Number.isFinite(value) ? value : undefined;  // empty: the server's default
}

function requestBody(prefill) {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = {
    model: state.model, messages, stream: true,
    // usage on every chunk: live tokens/s from the server's own token count
    stream_options: { include_usage: true, continuous_usage_stats: true },
    temperature: numberField("temperature"), top_p: numberField("top-p"),
    max_tokens: numberField("max-tokens"),
  };
  if (prefill) {
    // the answer goes on from the prefill, which the server sends back first (chat echo)
    messages.push({ role: "assistant", content: prefill });
    Object.assign(body, { continue_final_message: true, echo: true });
  }
  return body;
}

// Calls onEvents with the parsed `data:` payloads of each network read, until [DONE].
async function readEvents(response, onEvents) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();  // a partial line waits for the next read
      const events = [];
      let isDone = false;
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        isDone = isDone || data === "[DONE]";
        if (!isDone) events.push(JSON.parse(data));
      }
      onEvents(events);
      if (isDone) return;
    }
  } finally {
    reader.cancel().catch(() => {});  // an error event or a bad line: close the connection
  }
}

class ApiFailure extends Error {}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || !state.model || state.controller) return;
  $("prompt").value = "";
  $("error").hidden = true;
  const history = state.history;  // "New chat" mid-answer starts another; this one ends here
  history.push({ role: "user", content: text });
  const userNode = addMessage("user", text);
  const answer = new Answer(addMessage("assistant", ""));
  state.controller = new AbortController();
  setBusy(true);
  try {
    await streamAnswer(answer, requestBody($("prefill").value), state.controller.signal);
    history.push({ role: "assistant", content: answer.text });
  } catch (error) {
    failTurn(error, answer, history, userNode, text);
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

async function streamAnswer(answer, body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", body: JSON.stringify(body), signal,
    headers: { "Content-Type": "application/json", ...authHeaders(sessionStorage.getItem(KEY_STORAGE)) },
  });
  if (!response.ok) {
    if (response.status === 401) askForKey(await errorText(response));
    throw new ApiFailure(await errorText(response));
  }
  await readEvents(response, (events) => answer.apply(events));
  answer.finish(null);
}

// A stopped answer stays in the conversation; a refused request gives its text back.
function failTurn(error, answer, history, userNode, text) {
  if (error.name === "AbortError" || answer.text) {  // stopped, or failed mid-answer
    answer.finish(error.name === "AbortError" ? "stopped" : `failed: ${error.message}`);
    history.push({ role: "assistant", content: answer.text });
    return;
  }
  history.pop();
  userNode.remove();
  answer.node.remove();
  if (!$("prompt").value) $("prompt").value = text;
  $("error").textContent = error instanceof ApiFailure ? error.message : `Request failed: ${error.message}`;
  $("error").hidden = false;
}

function setBusy(busy) {
  $("send").disabled = busy || !state.model;
  $("stop").disabled = !busy;
}

// ---- one streamed answer: text, timing, stats ---------------------------------------------

class Answer {
  constructor(node) {
    this.node = node;
    this.text = "";
    this.reasoning = "";  // reasoning_content, with --reasoning-parser
    this.startedAt = performance.now();
    this.firstTokenAt = null;
    this.lastTokenAt = null;
    this.numTokens = 0;
    this.finishReason = null;
  }

  apply(events) {
    for (const chunk of events) {
      if (chunk.error) throw new ApiFailure(chunk.error.message);
      if (chunk.usage) this.numTokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) this.reasoning += delta.reasoning_content;
        const content = delta.content || "";
        if (content || delta.reasoning_content) {
          this.text += content;
          this.lastTokenAt = performance.now();
          if (this.firstTokenAt === null) this.firstTokenAt = this.lastTokenAt;
        }
        if (choice.finish_reason) this.finishReason = choice.finish_reason;
      }
    }
    if (events.length) this.render();
  }

  render() {
    this.node.sourceText = this.text;  // what its Copy button copies
    this.node.querySelector(".reasoning").textContent = this.reasoning;
    this.node.querySelector(".content").replaceChildren(renderMarkdown(this.text));
    this.node.querySelector(".stats").textContent = this.stats();
  }

  stats() {
    const parts = [];
    if (this.firstTokenAt !== null) {
      parts.push(`TTFT ${Math.round(this.firstTokenAt - this.startedAt)} ms`);
      const seconds = (this.lastTokenAt - this.firstTokenAt) / 1000;
      // the first token's time is TTFT: speed counts the tokens after it
      if (this.numTokens > 1 && seconds > 0) {
        parts.push(`${((this.numTokens - 1) / seconds).toFixed(1)} tok/s`);
      }
      parts.push(`${this.numTokens} tokens`);
    }
    if (this.finishReason) parts.push(this.finishReason);
    return parts.join(" · ");
  }

  finish(note) {
    if (note) this.finishReason = note;
    this.node.classList.add("done");
    this.render();
  }
}

// ---- messages and markdown ---------------------------------------------------------------

function addMessage(role, text) {
  const node = element("article", `message ${role}`);
  const head = element("header");
  const copy = element("button", "copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(node.sourceText, copy));
  head.append(element("span", "role", role), element("span", "stats"), copy);
  const content = element("div", "content");
  if (role === "user") content.textContent = text;  // the user's own text, shown as typed
  node.sourceText = text;
  node.append(head, element("div", "reasoning"), content);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {  // no clipboard API outside secure contexts (http on a LAN address)
    const area = element("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const INLINE = /`([^`\n]+)`|\*\*(\S(?:[\s\S]*?\S)?)\*\*|\*(\S(?:[^*]*?\S)?)\*|(?<!\w)_(\S(?:[^_]*?\S)?)_(?!\w)/g;

// A markdown subset (fenced code, headings, lists, paragraphs; inline code, bold, italic) as
// DOM nodes. An unterminated fence runs to the end, so a code block streams as code.
function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
    } else if (FENCE.test(line)) {
      i = appendCodeBlock(fragment, lines, i);
    } else if (HEADING.test(line)) {
      const [, hashes, title] = line.match(HEADING);
      const heading = element(`h${Math.min(hashes.length + 2, 6)}`);
      appendInline(heading, title);
      fragment.append(heading);
      i += 1;
    } else if (LIST_ITEM.test(line)) {
      i = appendList(fragment, lines, i);
    } else {
      i = appendParagraph(fragment, lines, i);
    }
  }
  return fragment;
}

function appendCodeBlock(parent, lines, start) {
  const language = lines[start].match(FENCE)[1];
  let end = start + 1;
  while (end < lines.length && !/^\s*```\s*$/.test(lines[end])) end += 1;
  const source = lines.slice(start + 1, end).join("\n");
  const block = element("div", "code-block");
  const bar = element("div", "code-bar", language);
  const copy = element("button", "copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(source, copy));
  bar.append(copy);
  const pre = element("pre");
  pre.append(element("code", "", source));
  block.append(bar, pre);
  parent.append(block);
  return end + 1;  // past the closing fence (or the end)
}

function appendList(parent, lines, start) {
  const isOrdered = /^\d/.test(lines[start].match(LIST_ITEM)[1]);
  const list = element(isOrdered ? "ol" : "ul");
  if (isOrdered) list.start = parseInt(lines[start].match(LIST_ITEM)[1], 10);
  let i = start;
  for (; i < lines.length; i += 1) {
    const match = lines[i].match(LIST_ITEM);
    if (!match || /^\d/.test(match[1]) !== isOrdered) break;
    const item = element("li");
    appendInline(item, match[2]);
    list.append(item);
  }
  parent.append(list);
  return i;
}

function appendParagraph(parent, lines, start) {
  let end = start;
  while (end < lines.length && lines[end].trim() && !FENCE.test(lines[end])
         && !HEADING.test(lines[end]) && !LIST_ITEM.test(lines[end])) end += 1;
  const paragraph = element("p");
  appendInline(paragraph, lines.slice(start, end).join("\n"));  // newlines kept by CSS
  parent.append(paragraph);
  return end;
}

// Text goes in as text nodes (append(string)), so "<img ...>" in model output stays text.
function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(text.slice(last, match.index));
    const [, code, bold, italic, underscored] = match;
    if (code !== undefined) {
      parent.append(element("code", "", code));
    } else {
      const emphasis = element(bold !== undefined ? "strong" : "em");
      appendInline(emphasis, bold ?? italic ?? underscored);
      parent.append(emphasis);
    }
    last = match.index + match[0].length;
  }
  parent.append(text.slice(last));
}

// ---- wiring ------------------------------------------------------------------------------

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("error").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadModel($("api-key").value.trim());
  });
  loadModel();
});
