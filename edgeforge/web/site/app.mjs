// The page: chat (default), or ?mode=smoke / ?mode=bench for `edgeforge smoke` / `edgeforge bench`.
// ?ep=auto|webgpu|wasm picks the execution provider (auto: WebGPU when there is an adapter).
// Smoke and bench publish their result as window.edgeforgeResult (and in #result).
import { BundleError, Engine, Sampler, loadManifest, pickProvider, verifyAll } from "./engine.mjs";
import { ChatTokenizer } from "./tokenizer.mjs";
import { bench, smoke } from "./golden.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const mode = params.get("mode") || "chat";
const base = new URL(".", location.href);
window.edgeforgeLog = [];

function log(line) {
  window.edgeforgeLog.push(line);
  console.log(`[edgeforge] ${line}`);
  $("status").textContent = line;
}

function publish(result) {
  window.edgeforgeResult = result;
  $("result").textContent = JSON.stringify(result, null, 1);
  $("result").hidden = false;
}

function notice(text, error = false) {
  $("notice").textContent = text;
  $("notice").className = error ? "error" : "";
  $("notice").hidden = false;
}

async function main() {
  const manifest = await loadManifest(base);
  $("model").textContent = `${manifest.model?.id || manifest.name} (${manifest.scheme})`;
  $("info").textContent = JSON.stringify({ bundle: manifest.name, config: manifest.config, quality: manifest.quality,
                                          runtime: manifest.runtime_requirements }, null, 1);
  const { ep, adapter, why } = await pickProvider(params.get("ep") || "auto");
  if (ep === "wasm" && why) notice(`WebGPU is not available (${why}): running on the CPU with WebAssembly, which is slower.`);
  const threads = params.has("threads") ? Number(params.get("threads")) : undefined;
  let checked = 0;
  if (mode === "smoke") checked = await verifyAll(base, manifest, log);
  const t0 = performance.now();
  const engine = await Engine.open({ base, manifest, ep, threads, log });
  const loadSeconds = (performance.now() - t0) / 1000;
  const tokenizer = await ChatTokenizer.open(base, manifest);
  const device = ep === "webgpu" ? `webgpu (${adapter})` : `wasm (${navigator.hardwareConcurrency} cores, ${crossOriginIsolated ? "threads" : "1 thread: not cross-origin isolated"})`;
  $("ep").textContent = `running on ${device}`;
  const facts = { bundle: manifest.name, target: manifest.target?.name, backend: manifest.backend, device, ep,
                  quality: manifest.quality, load_seconds: loadSeconds, files_checked: checked,
                  runtime: manifest.runtime_requirements, user_agent: navigator.userAgent };
  if (mode === "smoke") return publish({ ...facts, ...(await smoke({ base, manifest, engine, tokenizer, ep, log,
                                                                     maxPrompts: Number(params.get("prompts")) || 0 })) });
  if (mode === "bench") {
    const num = (k, d) => (params.has(k) ? Number(params.get(k)) : d);
    return publish({ ...facts, ...(await bench({ engine, pp: num("pp", 512), tg: num("tg", 128), reps: num("reps", 1), log })) });
  }
  chat(engine, tokenizer);
}

function chat(engine, tokenizer) {
  const history = [];
  const sampler = () => new Sampler({ temperature: Number(params.get("temperature") || 0), topP: Number(params.get("top_p") || 1),
                                      seed: Number(params.get("seed") || 0) });
  const maxTokens = Number(params.get("max_tokens") || 256);
  $("prompt").disabled = $("send").disabled = false;
  log("ready");
  $("ask").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text) return;
    $("prompt").value = "";
    $("prompt").disabled = $("send").disabled = true;
    bubble("user", text);
    const out = bubble("assistant", "");
    try {
      history.push({ role: "user", content: text });
      const answer = await generate(engine, tokenizer, tokenizer.encodeChat(history), maxTokens, sampler(), (t) => (out.textContent = t));
      history.push({ role: "assistant", content: answer });
    } catch (err) {
      history.pop();
      notice(String(err.message || err), true);
    }
    $("prompt").disabled = $("send").disabled = false;
    $("prompt").focus();
  });
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat").append(div);
  div.scrollIntoView();
  return div;
}

// Streams the answer into `show(text)`; the KV cache starts afresh each turn (prefill of the whole chat).
async function generate(engine, tokenizer, ids, maxTokens, sampler, show) {
  const room = engine.maxLength - ids.length;
  if (room < 1) throw new BundleError(`the conversation (${ids.length} tokens) fills the context of ${engine.maxLength}; reload to start afresh`);
  engine.reset();
  const t0 = performance.now();
  let logits = await engine.prefill(ids);
  const t1 = performance.now();
  const out = [];
  for (let i = 0; i < Math.min(maxTokens, room); i++) {
    const token = sampler.sample(logits);
    if (tokenizer.eosIds.includes(token)) break;
    out.push(token);
    show(tokenizer.decode(out));
    if (i + 1 < Math.min(maxTokens, room)) logits = await engine.decode(token);
  }
  const t2 = performance.now();
  const rate = out.length > 1 ? (out.length - 1) / ((t2 - t1) / 1000) : 0;
  $("speed").textContent = `prefill ${(ids.length / ((t1 - t0) / 1000)).toFixed(1)} tok/s, decode ${rate.toFixed(1)} tok/s`;
  return tokenizer.decode(out);
}

main().catch((err) => {
  const message = String(err.message || err);
  notice(message, true);
  log(`error: ${message}`);
  publish({ status: "ERROR", error: message });  // a refused file, no adapter, a load failure: exit 2
});
